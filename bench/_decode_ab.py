"""The decoders' CPU cost on one capture, for an A/B between two trees (issue 13, bench/SNOOPER.md).

    .venv/bin/python bench/_decode_ab.py TREE CAPTURE

TREE: a directory holding ``protocols/`` and ``capture/`` (this checkout, or e.g. ``git archive main
protocols capture | tar -x -C /tmp/old``). Feeds every frame of CAPTURE through that tree's Pipeline,
clean and with 3 % of the payload frames dropped in runs of 5 (bench/resync.py's drop_frames, seed 1);
prints CPU seconds (process_time, best of 3: load from other processes does not count), MB per CPU
second and CPU microseconds per frame, as one JSON line."""
import sys, time, json
root = sys.argv[1]; cap = sys.argv[2]
sys.path.insert(0, root)
from capture.pcapfile import read_capture
from protocols.pipeline import Pipeline
import inspect
zc = "zero_copy" in inspect.signature(Pipeline).parameters
frames = [(p.data, p.ts) for p in read_capture(open(cap, "rb"))]
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import resync
out = {}
for name, fr in (("clean", frames), ("gaps", resync.drop_frames(frames, 0.03, 5, 1)[0])):
    n = sum(len(f[0]) for f in fr)
    best = 1e9
    for _ in range(3):
        p = Pipeline(zero_copy=True) if zc else Pipeline()
        t0 = time.process_time()
        for b, ts in fr:
            p.feed_frame(b, ts)
        p.close()
        best = min(best, time.process_time() - t0)
    out[name] = {"frames": len(fr), "MB": round(n / 1e6, 1), "cpu_s": round(best, 3), "MB_per_cpu_s": round(n / best / 1e6), "us_per_frame": round(best / len(fr) * 1e6, 1)}
print(json.dumps({"tree": root, **out}))
