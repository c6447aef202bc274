"""Adversarial trials of the writing commands: kill -9 at random moments, three runs to one output,
and the hostile Hub scenarios, on a tiny model; prints one table of counts.

    python bench/adversarial.py [--trials 10] [--commands quantize,slice,...] [--seed 0] [--no-hub]

Per command, an undisturbed run is timed first (``T``, and when its build folder existed: the write
window); then each trial starts the command as its own process (``python -m matq_cli``, TMPDIR a
private folder), waits a random time (odd trials: from the moment its build folder appears, up to the
window's length; even trials: in ``[0, 1.2 T]``) and sends SIGKILL to its process group. Counted per command:

- ``killed``: trials whose run was still alive when killed (the others had finished);
- ``in window``: killed while its ``.OUT.partial-*`` build folder (the write window) existed;
- ``corrupt``: OUT present after the kill but not whole (a checkpoint failing ``matq verify``, a GGUF
  file gguf-py cannot read, an HF folder whose safetensors headers or config do not parse);
- ``inputs changed``: trials after which an input file's sha256 differs;
- ``litter``: trials after which, once the next (undisturbed, ``--force``) run to the same output has
  finished, ``.OUT.partial-*``, ``.OUT.old-*``, a lock of no live run, or anything in TMPDIR is left.

``3 runs``: three runs started together to one new output, repeated ``--trials`` times; ``once``
counts the repetitions where exactly one run published and the output is whole, the others failing
in one line. ``hub``: the scenarios of ``tests/test_hub_hostile.py`` (pytest), passed / run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/gguf.py would shadow gguf-py
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

COMMANDS = ("quantize", "import-matgptq", "slice", "convert-gguf", "convert-hf", "pull")


def env_for(tmpdir: Path, hub: str | None, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}  # no HF_HUB_OFFLINE
    env.update(TMPDIR=str(tmpdir), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    if hub:
        env.update(HF_ENDPOINT=hub, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    return env


def sha_tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def whole(kind: str, out: Path) -> bool:
    """Whether the output at ``out`` is complete and readable."""
    try:
        if kind == "gguf":
            import gguf

            gguf.GGUFReader(out)
            return True
        if kind == "hf":
            from matq_format.container import read_header

            json.loads((out / "config.json").read_text())
            shards = sorted(out.glob("*.safetensors"))
            for s in shards:
                read_header(s)
            return bool(shards)
        r = subprocess.run([sys.executable, "-m", "matq_cli", "verify", str(out)], capture_output=True)
        return r.returncode == 0
    except Exception:
        return False


def litter(out: Path, tmpdir: Path) -> list[str]:
    """What runs left beside ``out`` (build folders, replaced outputs, locks) and in TMPDIR; called
    when no run is writing ``out``."""
    tags = (f".{out.name}.partial-", f".{out.name}.old-", f".{out.name}.matq-lock")
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(tags)]
    return left + [f"TMPDIR/{p.name}" for p in tmpdir.iterdir()]


def partial_exists(out: Path) -> bool:
    try:
        return any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir())
    except FileNotFoundError:  # the folder above OUT is made by the run
        return False


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "matq_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def world(root: Path, want: set[str]):
    """The inputs: a tiny Llama, its checkpoint, a MatGPTQ folder, a Hub serving the checkpoint."""
    from tiny_models import tiny_hf_model

    hf = tiny_hf_model("llama", root / "in" / "hf")
    ck = root / "in" / "ck"
    r = subprocess.run([sys.executable, "-m", "matq_cli", "quantize", str(hf), "-o", str(ck)], capture_output=True)
    assert r.returncode == 0, r.stderr
    out = {"hf": hf, "ck": ck, "mg": None, "hub": None, "server": None}
    if "import-matgptq" in want:
        from test_matgptq import _float_model, _pack_matgptq

        out["mg"] = root / "in" / "mg"
        _pack_matgptq(_float_model(root / "in" / "float"), out["mg"], "F16")
    if "pull" in want:
        from hubserver import HubServer

        server = HubServer().start()
        out["server"], out["hub"] = server, server.url
        (root / "in" / "tmp").mkdir()
        env = {**env_for(root / "in" / "tmp", server.url, root / "in" / "home"), "HF_TOKEN": "hf_test_write"}
        r = subprocess.run([sys.executable, "-m", "matq_cli", "push", str(ck), "org/tiny"], env=env, capture_output=True)
        assert r.returncode == 0, r.stderr
    return out


def spec(command: str, w: dict, out: Path) -> tuple[list[str], list[Path], str]:
    """(arguments, inputs, output kind) of one run of ``command`` writing ``out``."""
    o = str(out)
    return {
        "quantize": (["quantize", str(w["hf"]), "-o", o, "--layers", "linear"], [w["hf"]], "matq"),
        "import-matgptq": (["import-matgptq", str(w["mg"]), "-o", o], [w["mg"]], "matq"),
        "slice": (["slice", str(w["ck"]), "--bits", "4", "-o", o], [w["ck"]], "matq"),
        "convert-gguf": (["convert", str(w["ck"]), "--to", "gguf", "--bits", "4", "-o", o], [w["ck"]], "gguf"),
        "convert-hf": (["convert", str(w["ck"]), "--to", "hf", "--bits", "4", "-o", o], [w["ck"]], "hf"),
        "pull": (["pull", "org/tiny", "--bits", "4", "-o", o], [], "matq"),
    }[command]


def kill_trials(command: str, w: dict, root: Path, trials: int, rng: random.Random) -> dict:
    base = root / command
    base.mkdir()
    tmpdir, home = base / "tmp", base / "home"
    tmpdir.mkdir()
    env = env_for(tmpdir, w["hub"], home)
    out = base / "out" / ("model.gguf" if command == "convert-gguf" else "model")
    args, inputs, kind = spec(command, w, out)
    before = sha_tree(*inputs)
    t0 = time.perf_counter()
    p = start(args, env)
    seen = []  # when the build folder existed: the write window
    while p.poll() is None:
        if partial_exists(out):
            seen.append(time.perf_counter() - t0)
        time.sleep(0.005)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        return {"command": command, "error": p.stderr.read().decode().strip().splitlines()[-1:]}
    window = (min(seen), max(seen)) if seen else (0.0, took)
    counts = dict(command=command, run_s=round(took, 2), trials=trials, killed=0, in_window=0, corrupt=0)
    counts.update(inputs_changed=0, litter=0)
    for i in range(trials):
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        p = start(args, env)
        if i % 2:  # every other trial: once the build folder is there, a random part of the window later
            t0 = time.perf_counter()
            while p.poll() is None and not partial_exists(out) and time.perf_counter() - t0 < 2 * took:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, window[1] - window[0]))
        else:
            time.sleep(rng.uniform(0, 1.2 * took))
        alive = p.poll() is None
        inside = alive and partial_exists(out)
        if alive:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        counts["killed"] += alive
        counts["in_window"] += inside
        if os.path.lexists(out) and not whole(kind, out):
            counts["corrupt"] += 1
        if sha_tree(*inputs) != before:
            counts["inputs_changed"] += 1
        r = subprocess.run([sys.executable, "-m", "matq_cli", *args, "--force"], env=env, capture_output=True)
        left = litter(out, tmpdir)
        if r.returncode != 0 or not whole(kind, out):
            left.append(f"next run failed: {r.stderr.decode().strip()[-200:]}")
        if left:
            counts["litter"] += 1
            counts.setdefault("seen", []).extend(left[:3])
    return counts


def concurrent_trials(w: dict, root: Path, trials: int) -> dict:
    base = root / "three"
    base.mkdir()
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    env = env_for(tmpdir, None, base / "home")
    once = 0
    for i in range(trials):
        out = base / f"out{i}"
        args, _, _ = spec("slice", w, out)
        procs = [start(args, env) for _ in range(3)]
        codes = []
        for p in procs:
            _, err = p.communicate()
            codes.append((p.returncode, err.decode().strip()))
        ok = [c for c, _ in codes if c == 0]
        failed_one_line = all(c == 1 and e.count("\n") == 0 for c, e in codes if c != 0)
        once += len(ok) == 1 and failed_one_line and whole("matq", out) and not litter(out, tmpdir)
    return {"trials": trials, "once": once}


def hub_scenarios() -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:benchmark", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_hub_hostile.py")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    passed = int(last.split(" passed")[0].split()[-1]) if " passed" in last else 0
    failed = int(last.split(" failed")[0].split()[-1]) if " failed" in last else 0
    return {"passed": passed, "run": passed + failed, "summary": last}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hub", action="store_true", help="skip the hostile Hub scenarios")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    a = ap.parse_args(argv)
    want = [c for c in a.commands.split(",") if c]
    unknown = set(want) - set(COMMANDS)
    if unknown:
        ap.error(f"unknown commands {sorted(unknown)}; known: {', '.join(COMMANDS)}")
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="matq-adversarial-"))
    w = None
    try:
        w = world(root, set(want))
        rows = [kill_trials(c, w, root, a.trials, rng) for c in want]
        three = concurrent_trials(w, root, a.trials)
        hub = None if a.no_hub else hub_scenarios()
    finally:
        if w and w["server"] is not None:
            w["server"].close()
        shutil.rmtree(root, ignore_errors=True)
    cols = ("trials", "killed", "in_window", "corrupt", "inputs_changed", "litter", "run_s")
    print(f"{'command':16s}" + "".join(f"{c:>16s}" for c in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['command']:16s}  could not run: {r['error']}")
            continue
        print(f"{r['command']:16s}" + "".join(f"{r[c]!s:>16s}" for c in cols))
    for r in rows:
        if r.get("seen"):
            print(f"  {r['command']} left: {sorted(set(r['seen']))[:5]}")
    print(f"3 runs to one output: published exactly once in {three['once']} of {three['trials']}")
    if hub is not None:
        print(f"hostile Hub scenarios (tests/test_hub_hostile.py): {hub['passed']} of {hub['run']} passed")
    if a.json:
        a.json.write_text(json.dumps({"kill": rows, "three": three, "hub": hub}, indent=2))


if __name__ == "__main__":
    main()
