"""The streaming writer's two ways to the disk (O_DIRECT staging, buffered + kernel copies), their fallbacks,
the output order, and the torch-free header/plan path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import converter.st_writer as io
import converter.tempfiles as tempfiles
from builders import build_qwen_checkpoint
from converter.pipeline import output_order
from converter.st_reader import Checkpoint
from converter.st_writer import OutSpec, StreamingWriter


def _source(tmp_path):
    """Tensors of every size class: odd byte counts, scalars, several dtypes, a few staging blocks long."""
    g = torch.Generator().manual_seed(0)
    t = {
        "a.big": torch.randn(300, 77, generator=g).to(torch.bfloat16),
        "a.odd": torch.randint(0, 255, (1001,), dtype=torch.uint8, generator=g),
        "b.scalar": torch.tensor(0.37, dtype=torch.float32),
        "b.i32": torch.randint(-9, 9, (33, 5), dtype=torch.int32, generator=g),
        "c.f16": torch.randn(513, generator=g).half(),
        "c.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "d.fp8": torch.randn(40, 9, generator=g).to(torch.float8_e4m3fn),
    }
    p = tmp_path / "src.safetensors"
    save_file(t, str(p), metadata={"k": "v"})
    return p, t


def _write(src: Checkpoint, out, direct: bool, changed: dict[str, torch.Tensor]) -> StreamingWriter:
    specs = [OutSpec(n, i.dtype, i.shape) for n, i in src.tensors.items()]
    w = StreamingWriter(out, specs, {"merged": "yes"}, direct=direct)
    for s in specs:
        if s.name in changed:
            w.write_tensor(s.name, changed[s.name])
        else:
            w.copy_tensor(s.name, src)
    w.commit()
    return w


@pytest.fixture
def small_stages(monkeypatch):
    monkeypatch.setattr(io, "STAGE_BYTES", 2 * io.BLOCK)  # many staging buffers for a small file
    monkeypatch.setattr(io, "STAGES", 3)


def _direct_possible(folder) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"")
    fd = io._open_direct(str(probe))
    if fd >= 0:
        os.close(fd)
    return fd >= 0


def _check_loads(path, tensors, changed):
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"merged": "yes"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            want = changed.get(k, v)
            got = f.get_tensor(k)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k


def test_direct_and_buffered_write_the_same_bytes(tmp_path, small_stages):
    p, tensors = _source(tmp_path)
    changed = {"a.odd": tensors["a.odd"].flip(0), "b.scalar": torch.tensor(-2.5)}
    with Checkpoint(p) as src:
        wd = _write(src, tmp_path / "direct.safetensors", True, changed)
        wb = _write(src, tmp_path / "buffered.safetensors", False, changed)
    assert not wb.direct
    assert wd.direct == _direct_possible(tmp_path)  # O_DIRECT where the filesystem takes it
    a, b = (tmp_path / "direct.safetensors").read_bytes(), (tmp_path / "buffered.safetensors").read_bytes()
    assert a == b and len(a) == wd.total
    _check_loads(tmp_path / "direct.safetensors", tensors, changed)
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".partial")]


def test_direct_write_refused_midway_falls_back(tmp_path, small_stages, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses its writes: the rest goes the ordinary way."""
    if not _direct_possible(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem (the buffered path is what runs here)")
    p, tensors = _source(tmp_path)
    real_write, real_open = io._pwrite_all, io._open_direct
    direct_fds, calls = set(), [0]

    def open_direct(path):
        fd = real_open(path)
        direct_fds.add(fd)
        return fd

    def flaky(fd, data, pos):
        if fd in direct_fds:
            calls[0] += 1
            if calls[0] > 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, pos)

    monkeypatch.setattr(io, "_open_direct", open_direct)
    monkeypatch.setattr(io, "_pwrite_all", flaky)
    with Checkpoint(p) as src:
        w = _write(src, tmp_path / "o.safetensors", True, {})
    assert calls[0] > 2 and not w.direct
    _check_loads(tmp_path / "o.safetensors", tensors, {})


def test_buffered_without_kernel_copy(tmp_path, monkeypatch):
    p, tensors = _source(tmp_path)
    monkeypatch.setattr(io, "_kernel_copy", [False])
    monkeypatch.setattr(io, "COPY_CHUNK", 1000)  # several chunks per tensor
    with Checkpoint(p) as src:
        _write(src, tmp_path / "o.safetensors", False, {})
    _check_loads(tmp_path / "o.safetensors", tensors, {})


def test_without_positioned_io(tmp_path, monkeypatch):
    """Systems without pread/pwrite/copy_file_range/O_DIRECT (Windows): seek + read/write under a lock."""
    for name in ("preadv", "pwrite", "copy_file_range", "O_DIRECT"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(io, "_kernel_copy", [False])
    p, tensors = _source(tmp_path)
    changed = {"c.f16": -tensors["c.f16"]}
    with Checkpoint(p) as src:
        w = _write(src, tmp_path / "o.safetensors", True, changed)
        assert not w.direct and torch.equal(src.get("a.big"), tensors["a.big"])
    _check_loads(tmp_path / "o.safetensors", tensors, changed)


@pytest.mark.parametrize("direct", [True, False])
def test_abort_leaves_nothing(tmp_path, small_stages, direct):
    p, _ = _source(tmp_path)
    with Checkpoint(p) as src:
        specs = [OutSpec(n, i.dtype, i.shape) for n, i in src.tensors.items()]
        w = StreamingWriter(tmp_path / "o.safetensors", specs, {}, direct=direct)
        w.copy_tensor(specs[0].name, src)
        w.abort()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["src.safetensors"]


def test_output_file_mode_follows_umask(tmp_path):
    p, _ = _source(tmp_path)
    old = os.umask(0o027)
    try:
        mode = 0o666 & ~0o027
        tempfiles.FILE_MODE, saved = mode, tempfiles.FILE_MODE
        with Checkpoint(p) as src:
            _write(src, tmp_path / "o.safetensors", True, {})
    finally:
        os.umask(old)
        tempfiles.FILE_MODE = saved
    assert (tmp_path / "o.safetensors").stat().st_mode & 0o777 == mode
    assert tempfiles.FILE_MODE == 0o666 & ~old


def test_scalar_and_all_equal_without_torch(tmp_path):
    t = {"bf": torch.tensor([0.15625], dtype=torch.bfloat16), "h": torch.tensor(3.0).half(),
         "f": torch.tensor(0.1, dtype=torch.float32), "d": torch.tensor(7.25, dtype=torch.float64),
         "i": torch.tensor(16, dtype=torch.int32), "ones_bf": torch.ones(5, dtype=torch.bfloat16),
         "ones_h": torch.ones(3).half(), "mixed": torch.tensor([1.0, 1.0, 0.5]), "neg0": torch.tensor([-0.0, 1.0])}
    p = tmp_path / "s.safetensors"
    save_file(t, str(p))
    with Checkpoint(p) as c:
        for k in ("bf", "h", "f", "d", "i"):
            assert c.scalar(k) == float(t[k].double().item()), k
        assert c.all_equal("ones_bf", 1.0) and c.all_equal("ones_h", 1.0)
        assert not c.all_equal("mixed", 1.0) and not c.all_equal("neg0", 1.0) and not c.all_equal("bf", 1.0)
        with pytest.raises(Exception, match="not a scalar"):
            c.scalar("ones_bf")


# -- output order -----------------------------------------------------------------------------------------
class _Plan:
    def __init__(self, touched, grow=None):
        self._touched, self._grow = set(touched), grow or {}

    def touched_keys(self):
        return self._touched

    def out_shape(self, name, shape):
        return self._grow.get(name, shape)


def test_output_order_groups_changed_layers(tmp_path):
    t = {}
    for b in (0, 1, 2, 10):
        t[f"blocks.{b}.q.qweight"] = torch.zeros(32, 16, dtype=torch.int8)
        t[f"blocks.{b}.q.proj_down"] = torch.zeros(16, 16, dtype=torch.bfloat16)
        t[f"blocks.{b}.q.scale"] = torch.zeros(3, dtype=torch.float32)
        t[f"blocks.{b}.norm.weight"] = torch.zeros(16, dtype=torch.bfloat16)
    p = tmp_path / "b.safetensors"
    save_file(t, str(p))
    touched = {f"blocks.{b}.q.proj_down" for b in (10, 2, 0)}
    with Checkpoint(p) as c:
        order = output_order(c, [_Plan(touched)])
        assert sorted(order) == sorted(c.tensors)
        first = [n for n in order if not n.startswith(("blocks.0.q.", "blocks.2.q.", "blocks.10.q."))]
        assert order[:len(first)] == first  # untouched tensors first, in the base's order
        assert first == [n for n in c.tensors if n in first]
        groups = [n.rpartition(".")[0] for n in order[len(first):]]
        assert groups == ["blocks.0.q"] * 3 + ["blocks.2.q"] * 3 + ["blocks.10.q"] * 3  # model order, contiguous
        assert [c.tensors[n].dtype for n in order[len(first):len(first) + 3]] == ["F32", "BF16", "I8"]
        # an order that would misalign a tensor is not used: a 3-element bf16 before an F32 in a group
        bad = {"x.a": torch.zeros(3, dtype=torch.bfloat16), "x.b": torch.zeros(2, dtype=torch.float32),
               "y.a": torch.zeros(2, dtype=torch.float32), "y.b": torch.zeros(3, dtype=torch.bfloat16)}
    p2 = tmp_path / "bad.safetensors"
    save_file(bad, str(p2))
    with Checkpoint(p2) as c:
        # changed groups x then y: x = [x.b F32, x.a BF16 (6 bytes)] leaves y.a (F32) at offset 14
        assert output_order(c, [_Plan({"x.a", "y.b"})]) == list(c.tensors)


def test_merged_tensors_stay_aligned(tmp_path):
    base = tmp_path / "base.safetensors"
    truth = build_qwen_checkpoint(base, blocks=2, dim=128, rank=16)
    with Checkpoint(base) as c:
        touched = {n for n in c.tensors if n.endswith(("proj_down", "proj_up")) and "blocks.1." in n}
        grow = {n: (c.tensors[n].shape[0], 48) for n in touched}
        order = output_order(c, [_Plan(touched, grow)])
        assert order != list(c.tensors) and truth
        pos = c.data_start
        for n in order:
            shape = grow.get(n, c.tensors[n].shape)
            assert (pos - c.data_start) % c.tensors[n].itemsize == 0, n
            spec = OutSpec(n, c.tensors[n].dtype, shape)
            pos += spec.nbytes


def test_planning_needs_no_torch(tmp_path):
    """Headers, family, LoRA parsing and the plan run before torch is loaded (the import overlaps copying)."""
    from lora_builders import random_lora_modules, write_lora

    base = tmp_path / "base.safetensors"
    truth = build_qwen_checkpoint(base, blocks=1, dim=128, rank=16)
    write_lora(tmp_path / "l.safetensors", random_lora_modules(truth["lora_targets"], rank=4, seed=0), "kohya")
    code = textwrap.dedent(f"""
        import sys
        from converter.pipeline import Options, open_session, output_order
        s = open_session({str(base)!r}, [{str(tmp_path / 'l.safetensors')!r}], Options())
        assert s.plan.ops and output_order(s.base, [s.plan])
        print("torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_stale_temp_sweep_spares_locked_and_live_files(tmp_path):
    """Temp files of dead writers go; a file whose pid looks dead but whose lock is held (a writer in another
    pid namespace or host sharing the folder) stays, as does a live process's."""
    import fcntl

    out = tmp_path / "m.safetensors"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale, locked, live = (tmp_path / f".m.safetensors.{pid}.x{i}.partial"
                           for i, pid in enumerate((dead, dead, os.getppid())))
    for p in (stale, locked, live):
        p.write_bytes(b"partial")
    fd = os.open(locked, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert tempfiles.remove_stale_temps(str(out)) == [stale.name]
        assert not stale.exists() and locked.exists() and live.exists()
    finally:
        os.close(fd)
    assert tempfiles.remove_stale_temps(str(out)) == [locked.name]


@pytest.mark.parametrize("direct", [True, False])
def test_copy_of_a_byte_range(tmp_path, small_stages, direct):
    """A tensor written as bytes [start, stop) of a base tensor (the export's cuts of whole rows) is those bytes;
    a range outside the tensor is refused."""
    p, tensors = _source(tmp_path)
    rows = tensors["a.big"][100:250]
    specs = [OutSpec("rows", "BF16", tuple(rows.shape)), OutSpec("odd", "U8", (1001,))]
    with Checkpoint(p) as src:
        w = StreamingWriter(tmp_path / "o.safetensors", specs, {"merged": "yes"}, direct=direct)
        w.copy_tensor("rows", src, "a.big", (100 * 77 * 2, 250 * 77 * 2))
        with pytest.raises(RuntimeError, match="bytes 0:1002 of a.odd"):
            w.copy_tensor("odd", src, "a.odd", (0, 1002))
        w.copy_tensor("odd", src, "a.odd", (0, 1001))
        w.commit()
    _check_loads(tmp_path / "o.safetensors", {"rows": rows, "odd": tensors["a.odd"]}, {})
