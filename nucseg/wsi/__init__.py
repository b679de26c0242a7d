"""Whole slides: reading, tiling and the tile cache, stitching, exports, measurements, batch and Dask runs."""
