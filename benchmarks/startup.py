"""How fast a mistaken command is answered: the wall time of a mistyped flag
(`train_structured.py --epoch 3`, answered with "did you mean --epochs?") and of a YAML file
with a bad value (`weight_decay: 1e-4`), each in a fresh interpreter, beside the time of
`python -c pass` and `python -c "import torch"` measured in the same run (what the machine
gives any Python start and any torch start at the moment).

    python benchmarks/startup.py [--repeats 5]

Prints the median and range of each, in seconds. Both answers come before torch is imported
(training_params), so on an idle machine they take little more than `python -c pass`.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from utils.errors import UsageParser  # noqa: E402


def timed(command, expect_status):
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != expect_status:
        raise SystemExit(f"benchmarks/startup.py: error: {' '.join(command)} exited {done.returncode}, "
                         f"expected {expect_status}: {done.stderr.strip()[:300]}")
    return seconds


def main(argv=None):
    parser = UsageParser(prog="benchmarks/startup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 100:
        parser.error(f"--repeats {args.repeats}: must be in 1..100")
    with tempfile.TemporaryDirectory() as directory:
        bad_yaml = os.path.join(directory, "bad.yaml")
        with open(bad_yaml, "w") as handle:
            handle.write("weight_decay: 1e-4\n")
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], 0),
            "python -c 'import torch'": ([sys.executable, "-c", "import torch"], 0),
            "train_structured.py --epoch 3": ([sys.executable, "train_structured.py", "--epoch", "3"], 2),
            "train_structured.py --config bad.yaml": ([sys.executable, "train_structured.py", "--config", bad_yaml],
                                                      2),
        }
        times = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved: a change of load affects every command alike
            for name, (command, status) in commands.items():
                times[name].append(timed(command, status))
    width = max(len(name) for name in times)
    print(f"{'command':<{width}}  median s  (min - max), {args.repeats} runs each; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, seconds in times.items():
        print(f"{name:<{width}}  {statistics.median(seconds):8.2f}  ({min(seconds):.2f} - {max(seconds):.2f})")


if __name__ == "__main__":
    main()
