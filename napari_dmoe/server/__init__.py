"""``dmoe serve``: an HTTP server that keeps dMoE models loaded and segments volumes sent by napari, 3D Slicer
or scripts (``napari_dmoe.client``), with the same engine as ``dmoe segment``.

app.py (FastAPI routes, limits, errors), schemas.py (request/reply models), models.py (loaded models),
work.py (one queue per device), geometry.py (reorientation to the engine's view and back).
"""
