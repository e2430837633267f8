import sys, glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = glob.glob(sys.argv[1])[0]
ea = EventAccumulator(d, size_guidance={"scalars": 0}); ea.Reload()
for tag in sorted(ea.Tags()["scalars"]):
    ev = ea.Scalars(tag)
    pick = [ev[0], ev[len(ev)//4], ev[len(ev)//2], ev[3*len(ev)//4], ev[-1]]
    print(f"{tag:32s}", " ".join(f"{e.step//1000}k:{e.value:.4g}" for e in pick))
