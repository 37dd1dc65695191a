import subprocess, sys, tempfile, json, time
from pathlib import Path
from benchmarks.http_runner_bench import Endpoint
n = sys.argv[1]
for rep in range(2):
  for kind in sys.argv[2:]:
    e = Endpoint(Path(tempfile.mkdtemp()))
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.http_runner_bench", "_client", kind, e.url, n, "64"], check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        print(kind, f"{int(n)/r['seconds']:.0f} req/s  {r['cpu_s']/int(n)*1e6:.0f} us cpu/req ok={r['ok']}", open('/proc/loadavg').read().split()[0], flush=True)
    finally:
        e.stop()
