"""Export for diffusers' Nunchaku Lite: a Nunchaku checkpoint (optionally with LoRAs merged on the way) as a
diffusers component folder that the stock diffusers model class loads.

* tree.py: every output tensor, its diffusers name, dtype, shape and how it is made (headers only);
* transform.py: the computed tensors of one layer (merge, then codec-level cuts and permutations);
* folder.py: shards, index and the atomic folder;  config.py: config.json;  run.py: the streamed pass.
"""

from .folder import parse_size  # noqa: F401
from .run import ExportOptions, export_diffusers, plan_export, render_export  # noqa: F401
from ..errors import ExportError  # noqa: F401
