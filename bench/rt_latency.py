"""RT wake-up lateness of this machine (issue 12 context): `python3 bench/rt_latency.py [rt]` polls every 10 ms for 20 s,
as SCHED_FIFO 20 with `rt`, and prints p50/p99/p999/max lateness in ms."""
import os, time, select, sys
rt = len(sys.argv) > 1
if rt:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
p = select.poll()
late = []
end = time.monotonic() + 20
nxt = time.monotonic()
while time.monotonic() < end:
    nxt += 0.01
    t = nxt - time.monotonic()
    p.poll(max(0, t * 1000))
    late.append((time.monotonic() - nxt) * 1000)
late.sort()
print("rt" if rt else "other", "p50 %.2f p99 %.2f p999 %.2f max %.1f n %d" % (late[len(late)//2], late[int(len(late)*.99)], late[int(len(late)*.999)], late[-1], len(late)))
