"""Library side of ``data_tools``: video io, face detection / tracking / crop, quality scores,
feature extraction (VAE latents, motion, FLAME, audio features) and shard building for raw
talking-head (and generic) video."""
