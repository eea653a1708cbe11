"""Prints every scalar of a run folder's TensorBoard event files as JSON lines
{"file", "tag", "step", "value"}, read with the tensorboard package's own readers: the raw event
loader (every event as written, duplicates included, CRCs checked) and, as a cross-check, the
EventAccumulator that TensorBoard's scalar dashboard reads through."""
import glob
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

run = sys.argv[1]
files = sorted(glob.glob(os.path.join(run, "events.out.tfevents.*")))
raw = []
for path in files:
    for event in LegacyEventFileLoader(path).Load():
        for value in event.summary.value:
            raw.append((value.tag, event.step, value.simple_value))
            print(json.dumps({"file": os.path.basename(path), "tag": value.tag,
                              "step": event.step, "value": value.simple_value}))

accumulator = EventAccumulator(run, size_guidance={"scalars": 0})
accumulator.Reload()
dashboard = sorted((tag, s.step, s.value) for tag in accumulator.Tags()["scalars"]
                   for s in accumulator.Scalars(tag))
if dashboard != sorted(raw):
    sys.exit(f"EventAccumulator read {len(dashboard)} scalars, the raw loader {len(raw)}")
