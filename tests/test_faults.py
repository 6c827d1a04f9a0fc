"""Fault matrix: hostile inputs and faults during the write, against the CLI in subprocesses.

The cases live in fault_cases.py (shared with scripts/faults.sh, which prints them as a table). Each test
asserts, for its case: the exit code; one `error:` line naming the offending file and the cause; no traceback;
no file at the output path; no temp file left; the base and the LoRAs byte-identical before and after.
A case with `today="why"` in fault_cases.py is marked xfail(strict=True): known to fail, until it is fixed (none
is now).

The cases are independent subprocess runs (most of their time is importing torch), so the module runs the
selected ones concurrently in a fixture, one worker per core (at most 4), and each test checks its own outcome.
"""

from __future__ import annotations

import pytest

from fault_cases import CASE_BY_ID, CASES, make_inputs, problems, run_cases

# converter internals used here: none (the matrix drives `python -m converter` / QWENLORA_MERGE_CMD)


def _param(case):
    marks = [pytest.mark.xfail(reason=case.today, strict=True)] if case.today else []
    return pytest.param(case.id, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory, qwen_int4):
    return make_inputs(tmp_path_factory.mktemp("fault_inputs"), base=qwen_int4.path)


@pytest.fixture(scope="module")
def outcomes(request, fault_inputs, tmp_path_factory):
    """Run every case selected in this session (and only those), concurrently."""
    wanted = {item.callspec.params["case_id"] for item in request.session.items
              if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
              and "case_id" in item.callspec.params}
    return run_cases([CASE_BY_ID[c] for c in sorted(wanted)], fault_inputs, tmp_path_factory.mktemp("fault_cases"))


@pytest.mark.parametrize("case_id", [_param(c) for c in CASES])
def test_fault(case_id, outcomes):
    o = outcomes[case_id]
    if o.skipped:
        pytest.skip(o.skipped)
    found = problems(CASE_BY_ID[case_id], o)
    assert not found, (f"{case_id}: " + "; ".join(found) + f"\n  exit: {o.exit_text}\n  note: {o.note}\n"
                       f"  stderr (tail): {o.stderr[-1500:]}")
