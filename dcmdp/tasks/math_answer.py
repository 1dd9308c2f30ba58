"""The ``math`` verifier: final answers of math problems compared with Hugging Face's math-verify.

Both the response and the reference are reduced to their final answer, then compared by
``math_verify.verify`` (symbolic / numeric equivalence: ``0.5`` = ``\\frac{1}{2}`` = ``1/2``,
``\\boxed{42}`` = ``42``, sets, intervals, LaTeX):

* a GSM8K-style ``#### 42`` marks the final answer: the text after the last ``####`` is used
  (reference answers of GSM8K hold the worked solution, then ``#### 42``);
* otherwise math-verify's own extraction finds it (``\\boxed{…}`` first, then the last
  expression / number, as in TRL and open-r1).

math-verify bounds each parse and comparison with ``signal.alarm``, which works only in the main
thread; in other threads (the trainer's gRPC handlers) it runs without that timeout.
"""

from __future__ import annotations

import threading

GSM8K_MARK = "####"
TIMEOUT_S = 5


def final_answer_text(text: str) -> str:
    """The text after the last ``####`` (commas of thousands removed), or ``text`` when it has none."""
    if GSM8K_MARK not in text:
        return text
    tail = text.rsplit(GSM8K_MARK, 1)[1].strip()
    return tail.replace(",", "") if tail.replace(",", "").replace(".", "").lstrip("-+").isdigit() else tail


def _parse(text: str, timeout):
    # optional and slow to import (sympy; the ml extra): only the `math` verifier needs it
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=timeout)


def _timeout():
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def reference_answer(answer: str):
    """math-verify's parse of the reference's final answer; ``ValueError`` naming the reference when
    there is none it can read (the dataset is wrong, not a response). ``dcmdp validate`` checks
    every reference with it before a run starts."""
    gold = _parse(final_answer_text(answer), _timeout())
    if not gold:
        raise ValueError(f"math verifier: cannot read a final answer in the reference {answer[-80:]!r}")
    return gold


def math_match(response: str, answer: str) -> float:
    """1.0 when the response's final answer is mathematically equal to the reference's, else 0.0.

    A reference whose final answer math-verify cannot parse raises ``ValueError`` naming it
    (:func:`reference_answer`)."""
    # optional and slow to import (sympy; the ml extra): only the `math` verifier needs it
    from math_verify import verify

    timeout = _timeout()
    gold = reference_answer(answer)
    pred = _parse(final_answer_text(response), timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
