"""The inference engine: plan, sliding windows, 2D and streamed 3D, routing maps, attribute sweeps."""
