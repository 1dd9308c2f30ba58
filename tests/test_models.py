"""Built-in tiny models and the local tokenizer, saved and loaded the Hugging Face way."""

import torch
from transformers import AutoModelForCausalLM

from dcmdp.models.tiny import build_model, num_parameters, save_model
from dcmdp.models.tokenizer import load_tokenizer
from dcmdp.spec import ModelSpec


def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    model, tok = build_model(ModelSpec(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1))
    ids = tok("07+45=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "07+45="
    save_model(model, tok, tmp_path)
    tok2 = load_tokenizer(tmp_path)
    assert tok2("07+45=", add_special_tokens=False)["input_ids"] == ids
    assert tok2.eos_token_id == tok.eos_token_id and tok2.padding_side == "left"
    assert tok2.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False) == "1+1="


def test_builtin_sizes_and_loading_a_local_folder(tmp_path):
    model, tok = build_model(ModelSpec())
    assert 500_000 < num_parameters(model) < 700_000
    moe, _ = build_model(ModelSpec(builtin="tiny-qwen3-moe"))
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    save_model(model, tok, tmp_path)
    loaded, _ = build_model(ModelSpec(path=str(tmp_path)))
    x = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits)
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(tmp_path)), type(model))


def test_same_seed_same_model():
    a, _ = build_model(ModelSpec(num_layers=1), seed=4)
    b, _ = build_model(ModelSpec(num_layers=1), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_missing_local_folder_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="spec.model.path"):
        build_model(ModelSpec(path=str(tmp_path)))
