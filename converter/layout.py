"""The vocabulary shared by the converter and the model families: layouts, layers, row segments, and the
`Family` base class. A leaf module: it imports nothing of the converter, so `mappings/` can import it
without importing anything that imports `mappings` back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Mapping, Protocol

if TYPE_CHECKING:
    import torch


MAX_RANK = 1024  # Nunchaku's kernel limit of a low-rank branch (Lora::MAX_RANK)
SVD_RANK = 64  # default rank budget of W4A4 updates that are not low-rank (full diffs, DoRA)
RANK_STEP = 16  # a low-rank branch's rank is a multiple of this (its packed tiles are 16 wide)
AWQ_GROUP = 64  # inputs per scale/zero group of an AWQ W4A16 layer (Nunchaku's and diffusers' kernels)


def round16(n: int) -> int:
    """The smallest rank a branch of `n` columns fits in (a multiple of RANK_STEP)."""
    return (n + RANK_STEP - 1) // RANK_STEP * RANK_STEP

# How the AWQ modulation layers take a LoRA (converter.modulation): the CLI's --mod choices.
MODULATION_MODES = ("calibrated", "requant", "biasfold", "skip")


class _Registry(type):
    """Iterating the Layout class gives its members, in the order declared (as an Enum's does)."""

    def __iter__(cls):
        return iter(tuple(cls._members.values()))

    def __len__(cls) -> int:
        return len(cls._members)


class Layout(str, metaclass=_Registry):
    """How a layer's weight is stored in the checkpoint: a small registry, so that a new storage layout is declared
    where its layer kind and codec are (a Python Enum cannot gain members). A member is its value as a string
    (`Layout.SVDQ_INT4 == "svdq-int4"`), has a `name` and `value` as an Enum member has, and the facts of the
    layout: `is_svdq` (a W4A4 layer with the checkpoint's uniform low-rank branch) and `group_size` (inputs per
    quantization scale; 0: not quantized). Made by `Layout.declare`, reached as `Layout.NAME` or
    `Layout.of(value)`; `for layout in Layout` walks them in the order declared."""

    name: str
    is_svdq: bool
    group_size: int
    _members: ClassVar[dict[str, Layout]] = {}

    def __new__(cls, value: str, name: str, is_svdq: bool = False, group_size: int = 0) -> Layout:
        member = super().__new__(cls, value)
        member.name, member.is_svdq, member.group_size = name, is_svdq, group_size
        return member

    @classmethod
    def declare(cls, name: str, value: str, *, is_svdq: bool = False, group_size: int = 0) -> Layout:
        """A new member `Layout.<name>` (an error if the name or the value is taken)."""
        if name in cls._members or hasattr(cls, name) or any(m == value for m in cls._members.values()):
            raise ValueError(f"layout {name} ({value}) is declared twice")
        member = cls(value, name, is_svdq, group_size)
        cls._members[name] = member
        setattr(cls, name, member)
        return member

    @classmethod
    def forget(cls, member: Layout) -> None:
        """Take a member out again (a test that declared one cleans up with it)."""
        del cls._members[member.name]
        delattr(cls, member.name)

    @classmethod
    def of(cls, value: str) -> Layout:
        for member in cls._members.values():
            if member == value:
                return member
        raise ValueError(f"no layout {value!r}")

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Layout.{self.name}"

    def __reduce__(self):
        return Layout.of, (self.value,)


# the layouts of Nunchaku checkpoints; their layer kinds are converter/layers/, their codecs converter/codecs/
Layout.SVDQ_INT4 = Layout.declare("SVDQ_INT4", "svdq-int4", is_svdq=True, group_size=64)
Layout.SVDQ_NVFP4 = Layout.declare("SVDQ_NVFP4", "svdq-nvfp4", is_svdq=True, group_size=16)
Layout.AWQ_W4A16 = Layout.declare("AWQ_W4A16", "awq-w4a16", group_size=AWQ_GROUP)
Layout.DENSE = Layout.declare("DENSE", "dense")  # plain 16-bit nn.Linear
Layout.VECTOR = Layout.declare("VECTOR", "vector")  # a 1-D parameter such as a norm weight


@dataclass(frozen=True)
class Layer:
    prefix: str
    layout: Layout
    in_features: int
    out_features: int
    has_bias: bool
    rank: int = 0  # SVDQ low-rank branch width
    dtype: str = "BF16"  # dtype of the 16-bit tensors of this layer

    def key(self, part: str) -> str:
        return f"{self.prefix}.{part}"


@dataclass(frozen=True)
class Segment:
    """Rows [lora_start, lora_start+rows) of a LoRA module's output land on rows
    [target_start, target_start+rows) of checkpoint layer `target`."""

    target: str
    target_start: int
    lora_start: int
    rows: int
    component: str = ""  # e.g. "q", "w3": for reports


def whole(layer: Layer) -> list[Segment]:
    return [Segment(layer.prefix, 0, 0, layer.out_features)]


def split_rows(layer: Layer, names: tuple[str, ...]) -> dict[str, list[Segment]]:
    """Per-component segments of a layer whose rows are the concatenation of equal parts `names`."""
    n = layer.out_features // len(names)
    return {c: [Segment(layer.prefix, i * n, 0, n, c)] for i, c in enumerate(names)}


def fused_modules(layer: Layer, fused: Mapping[str, tuple[tuple[str, str], ...]]
                  ) -> dict[str, list[Segment]] | None:
    """The modules a fused layer's rows are, as a family declares them once for the LoRA's names and diffusers'
    alike: `fused` = {layer prefix suffix: (component, module name after the block) in row order, equal parts}.
    {module's full name: its segments}, or None when `layer` is none of them."""
    for suffix, modules in fused.items():
        if layer.prefix.endswith(suffix):
            parent = layer.prefix[: -len(suffix)] + "."
            segments = split_rows(layer, tuple(component for component, _ in modules))
            return {parent + module: segments[component] for component, module in modules}
    return None


def fused_over(layers: list[Layer], names: tuple[str, ...]) -> list[Segment]:
    """A fused LoRA module (e.g. qkv) whose row parts land on separate layers."""
    out, start = [], 0
    for layer, c in zip(layers, names):
        out.append(Segment(layer.prefix, 0, start, layer.out_features, c))
        start += layer.out_features
    return out


@dataclass(frozen=True)
class DiffusersPart:
    """Rows [start, stop) of a checkpoint layer's output are the stock diffusers module `name` (the diffusers
    tree keeps apart what Nunchaku fuses: q/k/v, Z-Image's [w3; w1])."""

    name: str
    start: int
    stop: int

    @classmethod
    def of(cls, name: str, segments: list[Segment]) -> DiffusersPart:
        """The module `name` that is the rows of `segments` (one range) of its layer."""
        (segment,) = segments
        return cls(name, segment.target_start, segment.target_start + segment.rows)


class RowOrder(Protocol):
    """A layer whose stored output rows are a permutation of the rows a LoRA (diffusers) addresses."""

    def to_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        """LoRA row order -> checkpoint row order (rows are the first axis)."""

    def to_lora(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse."""


class Family:
    """A model family: how LoRA module names map onto a Nunchaku checkpoint's layers. Subclasses are data plus
    small pure methods (one module per family under `mappings/`); the logic lives in the converter."""

    name: ClassVar[str]
    title: ClassVar[str]
    model_class: ClassVar[str]
    signatures: ClassVar[tuple[str, ...]] = ()  # regexes recognising this family's LoRA modules
    # the timestep embedder that feeds the AWQ modulation layers (empty: the family has none)
    timestep_keys: ClassVar[Mapping[str, str]] = {}
    # the stock diffusers class that diffusers' Nunchaku Lite quantizer loads this family into (None: no export)
    diffusers_class: ClassVar[str | None] = None
    # the arguments of that class's __init__: the config.json keys it takes
    diffusers_config_keys: ClassVar[frozenset[str]] = frozenset()
    # a fused LoRA module (name suffix) and the split modules that cover its rows: a file holding all of them
    # stores one update twice (as diffusers' loader of that family reads such files), so the fused copy is ignored
    redundant_copies: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def matches(self, metadata: Mapping[str, str], tensors: Mapping) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def lora_targets(self, layers: Mapping[str, Layer]) -> dict[str, list[Segment]]:  # pragma: no cover
        """{LoRA module name: the row segments of checkpoint layers it lands on}."""
        raise NotImplementedError

    def diffusers_parts(self, layer: Layer) -> list[DiffusersPart] | None:
        """The stock diffusers modules `layer` becomes, each a range of its output rows (in the diffusers row order,
        see row_order); None: the diffusers tree has no place for it (the export is refused)."""
        return [DiffusersPart(layer.prefix, 0, layer.out_features)]

    def activation_shift(self, layer: Layer) -> float:
        """A constant Nunchaku's runtime adds to this layer's input before quantizing it, cancelled by the stored
        bias; diffusers' module adds none, so the export moves its effect into the bias. 0.0: none."""
        return 0.0

    def folded_bias(self, layer: Layer) -> tuple[tuple[int, int, float], ...]:
        """(start, stop, c): rows (diffusers order) whose stored bias carries a constant c that the diffusers block
        adds itself; the export takes it out."""
        return ()

    def row_order(self, prefix: str) -> RowOrder | None:
        """The stored row permutation of layer `prefix`, if it has one."""
        return None

    def smoothing_producers(self, prefix: str, layers: Mapping[str, Layer]) -> list[Segment] | None:
        """Where deepcompressor can fold layer `prefix`'s smoothing when it fuses it upstream
        (`fuse_when_possible`): the rows of the layers that produce its input, which then hold their true
        output divided by the smoothing vector. None: not known for this layer."""
        return None
