"""The synthetic scene world: CLEVR-like scenes of coloured shapes on a 3×3 grid, rendered, parsed back, described
at any density, and served over loopback HTTP with the web's faults mixed in. No torch imports here.

    from scenes import Scene, Obj, render, parse, describe, render_dataset, start_server
"""

from scenes.dataset import render_dataset
from scenes.describe import alt, describe
from scenes.parse import parse
from scenes.render import render
from scenes.scene import Obj, Scene, random_scene
from scenes.serve import serve_forever, start_server

__all__ = [
    "Obj", "Scene", "alt", "describe", "parse", "random_scene", "render", "render_dataset", "serve_forever",
    "start_server",
]
