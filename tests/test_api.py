"""The Python API (`from converter import merge, plan, batch, verify, export_diffusers`): each function does what
its command does (same bytes, same report as `--json`), raises the typed errors with the command's exit codes,
calls the progress callback with growing values, and the README's examples run as written."""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checks import run
from lora_builders import random_lora_modules, write_lora

import converter
from converter import api
from converter.errors import MergeError
from converter.st_reader import Checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES_RX = re.compile(r"<!-- python-api:begin -->(.*?)<!-- python-api:end -->", re.S)
TIMING = ("seconds",)  # the only figures two identical runs may differ in


def _lora(truth, path, *, modulation: bool = False, seed: int = 1) -> Path:
    targets = {name: shape for name, shape in truth["lora_targets"].items()
               if "attn" in name or "mlp" in name or name == "img_in" or (modulation and "_mod." in name)}
    write_lora(path, random_lora_modules(targets, rank=16, seed=seed), "diffusers")
    return path


def _cli_json(*args) -> dict:
    return json.loads(run(*args).stdout)


def _without(report: dict, *keys: str) -> dict:
    return {key: value for key, value in report.items() if key not in keys}


def _as_json(report) -> dict:
    """What the API returned, through the serialisation the CLI prints."""
    return json.loads(report.to_json())


# -- merge / plan / batch ------------------------------------------------------------------------------------------
def test_merge_writes_the_clis_bytes_and_returns_its_json_report(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors", modulation=True)
    cli_out, api_out = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    cli = _cli_json(base, f"{lora}:0.8", "-o", cli_out, "--json")
    seen = []
    report = api.merge(base, [(lora, 0.8)], api_out, progress=lambda done, total, what: seen.append((done, total)))
    assert isinstance(report, api.Report) and isinstance(report, dict)
    assert api_out.read_bytes() == cli_out.read_bytes()
    assert report["output"] == str(api_out) and cli["output"] == str(cli_out)
    mine = _as_json(report)
    assert _without(mine, "output", "output_planned", *TIMING) == _without(cli, "output", "output_planned", *TIMING)
    assert mine["layers"] and any(layer["method"] == "modulation" for layer in mine["layers"])
    # progress: bytes written, growing to the output's tensor bytes
    dones = [done for done, _ in seen]
    assert len(seen) > 3 and dones == sorted(dones) and dones[0] > 0
    totals = {total for _, total in seen}
    assert len(totals) == 1 and dones[-1] == totals.pop() < os.path.getsize(api_out)


def test_plan_is_the_dry_run_report_exactly(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    out = tmp_path / "planned.safetensors"
    cli = _cli_json(base, f"{lora}:0.5", "-o", out, "--dry-run", "--json", "--max-rank", "64")
    report = api.plan(base, [f"{lora}:0.5"], out, max_rank=64)
    assert _as_json(report) == cli and report["dry_run"] is True and not out.exists()
    assert report["rank"]["to"] == 64
    # the rank's cost, before anything is written: what the merge then adds to the base's tensors
    api.merge(base, [f"{lora}:0.5"], out, max_rank=64, mod="skip")
    with Checkpoint(base) as before, Checkpoint(out) as after:
        grown = sum(t.nbytes for t in after.tensors.values()) - sum(t.nbytes for t in before.tensors.values())
    assert report["rank"]["added_bytes"] == grown != 0


def test_every_form_of_a_lora_plans_alike(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    reports = [api.plan(base, [form]) for form in
               (f"{lora}:0.8", (lora, 0.8), (str(lora), 0.8), api.LoraSpec(str(lora), 0.8))]
    assert all(report == reports[0] for report in reports)
    assert reports[0]["loras"][0]["strength"] == 0.8
    alone = api.plan(base, lora)  # one LoRA, not in a list
    assert alone["loras"][0]["path"] == str(lora) and alone["loras"][0]["strength"] == 1.0


def test_batch_matches_the_cli_batch(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    cli_dir.mkdir(), api_dir.mkdir()
    cli = json.loads(run("batch", base, "--output-set", f"{cli_dir / 'a.safetensors'}={lora}:0.4",
                         "--output-set", f"{cli_dir / 'b.safetensors'}={lora}:-1", "--mod", "skip",
                         "--json").stdout)["outputs"]
    reports = api.batch(base, [(api_dir / "a.safetensors", [(lora, 0.4)]), (api_dir / "b.safetensors", [(lora, -1)])],
                        mod="skip")
    assert len(reports) == 2
    for mine, theirs, name in zip(reports, cli, ("a.safetensors", "b.safetensors")):
        assert (api_dir / name).read_bytes() == (cli_dir / name).read_bytes()
        skip = ("output", "output_planned", *TIMING)
        assert _without(_as_json(mine), *skip) == _without(theirs, *skip)


def test_batch_plan_entries_are_lora_specs_relative_to_the_plan(tmp_path):
    from converter.batchfile import read_batch_file

    plan_file = tmp_path / "plans" / "plan.json"
    plan_file.parent.mkdir()
    plan_file.write_text(json.dumps({"outputs": [
        {"output": "a.safetensors", "loras": ["x.safetensors:0.8", {"path": "y.safetensors", "strength": 0.1 + 0.2}]},
        {"loras": [{"path": "/abs/z.safetensors"}, "w.safetensors"]}]}), encoding="utf-8")
    folder = str(plan_file.parent)
    assert read_batch_file(str(plan_file)) == [
        (os.path.join(folder, "a.safetensors"), [api.LoraSpec(os.path.join(folder, "x.safetensors"), 0.8),
                                                 api.LoraSpec(os.path.join(folder, "y.safetensors"), 0.1 + 0.2)]),
        (None, [api.LoraSpec("/abs/z.safetensors", 1.0), api.LoraSpec(os.path.join(folder, "w.safetensors"))])]


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors_are_typed_with_the_clis_exit_code_and_message(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    out = tmp_path / "o.safetensors"
    g = torch.Generator().manual_seed(0)
    flux = {f"double_blocks.{i}.img_attn.qkv": (torch.randn(4, 256, generator=g), torch.randn(768, 4, generator=g),
                                                None) for i in range(3)}
    write_lora(tmp_path / "flux.safetensors", flux, "kohya")
    out.write_bytes(b"already here")
    cases = [([f"{tmp_path / 'missing.safetensors'}:0.8"], {}, api.MergeError, 2),
             ([f"{lora}:0,8"], {}, api.MergeError, 2),
             ([str(tmp_path / "flux.safetensors")], {}, api.UnmappedKeys, 3),
             ([str(lora)], {}, api.MergeError, 2)]  # the output exists
    for loras, options, error, code in cases:
        with pytest.raises(error) as raised:
            api.merge(base, loras, out, **options)
        assert raised.value.exit_code == code
        cli = run(base, *loras, "-o", out, ok=False)
        assert cli.exit_code == code and cli.stderr == f"error: {raised.value}\n"
    assert out.read_bytes() == b"already here"
    with pytest.raises(api.MergeError, match="cannot open .*no-base.safetensors"):
        api.plan(tmp_path / "no-base.safetensors", [lora])
    with pytest.raises(api.MergeError, match="not a finite number"):
        api.LoraSpec(str(lora), float("inf"))
    with pytest.raises(api.MergeError, match="not a number"):
        api.LoraSpec(str(lora), True)
    with pytest.raises(api.MergeError, match="a LoRA is a path"):
        api.plan(base, [3])


def test_an_os_error_is_a_file_error_worded_as_the_cli_words_it(qwen_int4, tmp_path, monkeypatch):
    from converter import st_writer

    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    out = tmp_path / "o.safetensors"

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(st_writer.StreamingWriter, "copy_tensor", disk_full)
    with pytest.raises(api.FileError) as raised:
        api.merge(base, [lora], out, mod="skip")
    assert raised.value.exit_code == 2 and isinstance(raised.value.__cause__, OSError)
    assert str(raised.value) == f"{os.strerror(errno.ENOSPC)}: {out}"
    cli = run(base, lora, "-o", out, "--mod", "skip", ok=False)
    assert cli.exit_code == 2 and cli.stderr == f"error: {raised.value}\n"
    assert not out.exists() and [path.name for path in tmp_path.iterdir()] == ["style.safetensors"]


def test_every_error_class_is_a_merge_error_with_a_documented_exit_code():
    from converter import errors as module

    public = [getattr(api, name) for name in api.__all__]
    errors = [obj for obj in public if isinstance(obj, type) and issubclass(obj, BaseException)]
    defined = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, MergeError)]
    assert set(defined) <= set(errors) and api.ExportError in errors  # every one is public
    documented = README.read_text(encoding="utf-8") + module.__doc__
    for error in errors:
        assert issubclass(error, MergeError) and error.exit_code in (2, 3, 4)
        assert error.__name__ in documented and error.__doc__
    assert api.UnmappedKeys.exit_code == 3 and api.VerifyFailed.exit_code == 4


# -- verify --------------------------------------------------------------------------------------------------------
def test_verify_returns_the_clis_json_and_raises_only_when_asked(qwen_int4, tmp_path):
    from converter.st_reader import Checkpoint
    from converter.st_writer import OutSpec, StreamingWriter

    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    merged = tmp_path / "m.safetensors"
    api.merge(base, [(lora, 0.8)], merged, mod="skip")
    seen = []
    report = api.verify(base, merged, progress=lambda done, total, what: seen.append((done, total, what)))
    assert isinstance(report, api.VerifyReport) and report.ok and report.failed == []
    cli = run("verify", base, merged, "--json")
    assert _as_json(report) == json.loads(cli.stdout)
    assert [done for done, _, _ in seen] == list(range(1, len(seen) + 1)) and seen[-1][1] == len(seen)
    assert all(isinstance(what, str) and what for _, _, what in seen)
    assert api.verify(base, merged, [(lora, 0.8)], check=True).ok
    broken = tmp_path / "broken.safetensors"  # one low-rank factor scaled: a layer out of tolerance
    with Checkpoint(merged) as ckpt:
        name = next(key for key in ckpt.keys() if key.endswith(".attn.to_out.0.proj_up"))
        writer = StreamingWriter(broken, [OutSpec(i.name, i.dtype, i.shape) for i in ckpt.tensors.values()],
                                 ckpt.metadata)
        for key in ckpt.keys():
            tensor = ckpt.get(key)
            writer.write_tensor(key, tensor * 2 if key == name else tensor)
        writer.commit()
    failed = api.verify(base, broken, [(lora, 0.8)])
    assert not failed.ok and failed.failed
    with pytest.raises(api.VerifyFailed) as raised:
        api.verify(base, broken, [(lora, 0.8)], check=True)
    assert raised.value.exit_code == 4 and raised.value.report == failed
    assert run("verify", base, broken, f"{lora}:0.8", ok=False).exit_code == 4


# -- export --------------------------------------------------------------------------------------------------------
def test_export_writes_the_clis_folder_and_report(qwen_int4, tmp_path):
    base, truth = qwen_int4
    lora = _lora(truth, tmp_path / "style.safetensors")
    cli = _cli_json("export-diffusers", base, f"{lora}:0.8", "-o", tmp_path / "cli", "--json", "--mod", "skip",
                    "--max-shard-size", "200KB")
    seen = []
    report = api.export_diffusers(base, [(lora, 0.8)], tmp_path / "api", mod="skip", max_shard_size=200_000,
                                  progress=lambda done, total, what: seen.append(done))
    files = sorted(os.listdir(tmp_path / "cli"))
    assert len(files) > 3 and sorted(os.listdir(tmp_path / "api")) == files  # shards, index, config
    for name in files:
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    skip = ("output", "output_planned", *TIMING)
    assert _without(_as_json(report), *skip) == _without(cli, *skip)
    assert seen == sorted(seen) and seen[-1] == report["expected_output_bytes"]
    dry = api.export_diffusers(base, [], tmp_path / "dry", dry_run=True)
    assert dry["dry_run"] is True and not (tmp_path / "dry").exists()


def test_export_of_an_unexportable_base_is_an_export_error(qwen_int4_fused_smooth, tmp_path):
    with pytest.raises(api.ExportError) as raised:
        api.export_diffusers(qwen_int4_fused_smooth.path, [], tmp_path / "x")
    assert raised.value.exit_code == 2 and not (tmp_path / "x").exists()


# -- the public surface ------------------------------------------------------------------------------------------
def test_import_converter_stays_light_and_exposes_the_api_lazily():
    code = ("import sys, converter\n"
            "assert not [m for m in sys.modules if m.startswith('converter.') or m in ('torch', 'click')]\n"
            "from converter import merge, plan, batch, verify, export_diffusers, LoraSpec, MergeError\n"
            "import converter.verification, converter.api\n"
            "from converter import verify as again\n"
            "assert again is converter.api.verify and callable(again)\n"
            "assert 'torch' not in sys.modules, 'the API loads torch only when a layer is computed'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_public_names_are_declared_and_documented():
    assert converter.__all__ == api.__all__
    for name in api.__all__:
        assert getattr(converter, name) is getattr(api, name)
    for function in (api.merge, api.plan, api.batch, api.verify, api.export_diffusers, api.LoraSpec.parse,
                     api.LoraSpec.of, api.Report.to_json):
        doc = inspect.getdoc(function)
        assert "Args:" in doc and "Returns:" in doc, function.__name__
        for parameter in inspect.signature(function).parameters:
            assert parameter in ("self", "cls") or parameter in doc or parameter in api.__doc__, (function, parameter)
    assert "Args:" in inspect.getdoc(api.LoraSpec)


def test_the_command_line_has_the_apis_defaults():
    from converter.cli import RunSettings

    settings = RunSettings().api_options()
    signature = inspect.signature(api.merge).parameters
    assert settings == {name: signature[name].default for name in settings}


# -- the README ----------------------------------------------------------------------------------------------------
def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    from converter.demo import main as build_demo

    assert build_demo([str(tmp_path)]) == 0
    match = EXAMPLES_RX.search(README.read_text(encoding="utf-8"))
    assert match, "README.md lacks the Python API examples between their markers"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "merging 100.0%" in printed and "rank 32 -> 80" in printed
    assert "svdq-int4_r80-qwen-image-demo+demo-style-lora.safetensors" in printed
    assert "MergeError (exit 2): the strength '0,8'" in printed and "verify: OK" in printed
    assert (tmp_path / "merged.safetensors").is_file() and (tmp_path / "demo-diffusers" / "config.json").is_file()
    assert "QwenImageTransformer2DModel ['diffusion_pytorch_model.safetensors']" in printed
