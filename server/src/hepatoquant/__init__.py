"""HepatoQuant: liver tissue quantification on whole-slide images (research use only).

The engine's functions are shared by the command line, the server and the benchmarks; see the modules
``slide``, ``tissue``, ``tiling``, ``tile_reader``, ``encoders``, ``model_pack``, ``classify``, ``regions``,
``quantify``, ``outputs`` and ``analysis``.
"""

__version__ = "0.1.0"

RESEARCH_USE_NOTICE = (
    "Research use only: HepatoQuant and the HepatoBench data it builds on are not approved for diagnostic use."
)
