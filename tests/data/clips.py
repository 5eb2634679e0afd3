"""Generated video clips for the media and encode tests."""

import av
import numpy as np


def write_clip(path, n=16, w=64, h=48, fps=4, codec="ffv1"):
    """Frame i is a solid colour (10*i, 255-10*i, 100): decoded colour tells which frame it is."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for i in range(n):
            arr = np.empty((h, w, 3), np.uint8)
            arr[...] = (10 * i, 255 - 10 * i, 100)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
