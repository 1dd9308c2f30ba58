"""The HF rollout engine at every precision: logprobs, weight updates, noise, errors."""

import pytest
import torch

from dcmdp.engine import EngineError, SamplingParams, engine_class, make_engine
from dcmdp.models.tiny import build_model, save_model
from dcmdp_trainer.warmstart import prompt_ids
from runs import tiny_run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_model(tiny_run().spec.model, seed=3)
    return save_model(model, tok, tmp_path_factory.mktemp("model")), model, tok


def teacher_forced(model, prompt, response):
    with torch.no_grad():
        lp = model(torch.tensor([prompt + response])).logits.float().log_softmax(-1)[0]
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(response)]


def mean_delta(model, prompts, samples):
    tot, n = 0.0, 0
    for s in samples:
        tf = teacher_forced(model, prompts[s.prompt_index], s.response_ids)
        for a, b in zip(tf, s.logprobs):
            tot += abs(torch.tensor(a).exp() - torch.tensor(b).exp()).item()
            n += 1
    return tot / n


def test_registered_by_entry_point_and_unknown_engine_is_a_clear_error():
    assert engine_class("hf").__name__ == "HFEngine"
    with pytest.raises(EngineError, match="unknown rollout engine 'nope'"):
        engine_class("nope")


@pytest.mark.parametrize("precision,max_delta", [("fp32", 1e-6), ("bf16", 5e-2), ("fp16", 5e-3), ("int8", 5e-2), ("fp8", 5e-2),
                                                     ("int4", 2e-1)])
def test_precisions_sample_with_their_own_logprobs(model_dir, precision, max_delta):
    folder, model, tok = model_dir
    eng = make_engine("hf", str(folder), precision)
    prompts = [prompt_ids(tok, f"{i}+{i}=") for i in range(6)]
    out = eng.generate(prompts, list(range(6)), SamplingParams(n=3, max_new_tokens=3, seed=7))
    assert len(out) == 18 and [s.prompt_index for s in out[:3]] == [0, 0, 0]
    for s in out:
        assert len(s.logprobs) == len(s.response_ids) and all(lp <= 0 for lp in s.logprobs)
    d = mean_delta(model, prompts, out)
    assert d < max_delta
    if precision == "fp32":
        assert d < 1e-6
    else:
        assert d > 1e-7  # lower precision really differs from the fp32 trainer


def test_same_seed_same_samples_and_weight_update_takes(model_dir):
    folder, model, tok = model_dir
    eng = make_engine("hf", str(folder), "bf16")
    prompts = [prompt_ids(tok, "1+2=")]
    params = SamplingParams(n=4, max_new_tokens=3, seed=11)
    a, b = eng.generate(prompts, [0], params), eng.generate(prompts, [0], params)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    # named_parameters lists a tied weight once (state_dict lists it under both names)
    new = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.named_parameters()}
    eng.load_weights(new, version=5)
    assert eng.version == 5
    assert torch.equal(eng.model.model.embed_tokens.weight, new["model.embed_tokens.weight"].to(torch.bfloat16))
    with pytest.raises(EngineError, match="does not fit"):
        eng.load_weights({"nope": torch.zeros(1)}, version=6)


def test_logit_noise_raises_the_mismatch(model_dir):
    folder, model, tok = model_dir
    prompts = [prompt_ids(tok, f"{i}+1=") for i in range(8)]
    params = SamplingParams(n=4, max_new_tokens=3, seed=1)
    clean = mean_delta(model, prompts, make_engine("hf", str(folder), "fp32").generate(prompts, list(range(8)), params))
    noisy = mean_delta(model, prompts, make_engine("hf", str(folder), "fp32", noise=1.0).generate(prompts, list(range(8)), params))
    assert noisy > 100 * max(clean, 1e-9) and noisy > 1e-3


def test_greedy_is_deterministic_argmax(model_dir):
    folder, model, tok = model_dir
    eng = make_engine("hf", str(folder), "fp32")
    p = prompt_ids(tok, "3+4=")
    out = eng.generate([p], [0], SamplingParams(n=2, max_new_tokens=1, temperature=0.0))
    with torch.no_grad():
        best = int(model(torch.tensor([p])).logits[0, -1].argmax())
    assert out[0].response_ids == out[1].response_ids == [best]


def test_int4_serves_the_group_wise_round_trip_of_the_weights(model_dir):
    """The int4 engine's model is the trainer's with dcmdp.int4's round trip on every decoder
    Linear (embedding and LM head kept), at the pool's group size, and it follows weight updates."""
    import copy

    from dcmdp.int4 import int4_roundtrip_model_

    folder, model, tok = model_dir
    eng = make_engine("hf", str(folder), "int4", options={"quant_group_size": 16})
    want = copy.deepcopy(model)
    int4_roundtrip_model_(want, 16)
    for (name, got), ref in zip(eng.model.state_dict().items(), want.state_dict().values()):
        assert torch.equal(got, ref), name
    coarse = make_engine("hf", str(folder), "int4", options={"quant_group_size": 128})
    assert not torch.equal(coarse.model.model.layers[0].mlp.down_proj.weight, eng.model.model.layers[0].mlp.down_proj.weight)
    new = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.named_parameters()}
    eng.load_weights(new, version=2)
    w = new["model.layers.0.self_attn.q_proj.weight"]
    from dcmdp.int4 import int4_roundtrip
    assert torch.equal(eng.model.model.layers[0].self_attn.q_proj.weight, int4_roundtrip(w, 16))
    with pytest.raises(EngineError, match="quantGroupSize"):
        make_engine("hf", str(folder), "int4", options={"quant_group_size": 0})


def test_unsupported_precision_is_rejected(model_dir):
    with pytest.raises(EngineError, match="unsupported precision"):
        make_engine("hf", str(model_dir[0]), "fp4")


def test_bucket_slices_load_in_place_like_whole_tensors(model_dir):
    """``load_slices``: each bucket's pieces written straight into the weights (tensors spanning
    buckets never assembled) give the same engine as ``load_weights``; a tensor whose elements
    did not all arrive is missing."""
    from dcmdp.transport.buckets import Assembler, iter_buckets, plan

    folder, model, tok = model_dir
    new = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.named_parameters()}
    lay = plan(new, "bf16", bucket_bytes=4096)  # small buckets: most tensors span several
    whole, sliced = make_engine("hf", str(folder), "fp32"), make_engine("hf", str(folder), "fp32")
    whole.load_weights({k: v.to(torch.bfloat16) for k, v in new.items()}, version=2)
    asm = Assembler(lay)
    sliced.begin_update()
    for i, data in iter_buckets(new, lay, buffers=2):
        sliced.load_slices(asm.slices(i, data))
    sliced.finish_update(2)
    for k, v in whole.master.state_dict().items():
        assert torch.equal(sliced.master.state_dict()[k], v), k
    partial = make_engine("hf", str(folder), "fp32")
    partial.begin_update()
    asm = Assembler(lay)
    for i, data in iter_buckets(new, lay, buffers=2):
        if i != 1:  # bucket 1 lost
            partial.load_slices(asm.slices(i, data))
    with pytest.raises(EngineError, match="missing"):
        partial.finish_update(3)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "fp8"])
def test_each_precision_serves_what_the_table_says_before_and_after_an_update(model_dir, precision):
    """dcmdp.precision: float precisions cast to their compute dtype; int8 serves dynamically
    quantised Linears; fp8 serves fp32 Linears whose rows lie on a scaled float8-e4m3 grid."""
    folder, model, _ = model_dir
    eng = make_engine("hf", str(folder), precision)
    state = {k: v + 0.01 for k, v in model.state_dict().items()}  # an update every precision must take
    for version in (0, 1):
        if version:
            eng.load_weights(state, version)
        linear = eng.model.model.layers[0].self_attn.q_proj
        master = eng.master.model.layers[0].self_attn.q_proj.weight
        assert eng.model.model.embed_tokens.weight.dtype == {
            "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "int8": torch.float32, "fp8": torch.float32}[precision]
        if precision == "int8":
            assert isinstance(linear, torch.ao.nn.quantized.dynamic.Linear)
            assert torch.allclose(linear.weight().dequantize(), master, atol=master.abs().max().item() / 100)
        elif precision == "fp8":
            scale = master.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
            assert torch.equal(linear.weight, (master / scale).to(torch.float8_e4m3fn).float() * scale)
            assert not torch.equal(linear.weight, master)
        else:
            assert torch.equal(linear.weight, master.to(linear.weight.dtype))
    assert torch.equal(master, state["model.layers.0.self_attn.q_proj.weight"])
