"""Pack what bench/gpu_check.py needs on a lent GPU machine that has torch and transformers but no internet, so that a
session that is lent one spends its minutes on the checks (bench/GPU.md):

    .venv/bin/python bench/gpu_bundle.py [--out .gpucheck] [--verify]

Writes OUT/whl (this venv's DeepSpeed built as a wheel, and its pure dependencies and pydantic's at this venv's
versions, for CPython 3.10-3.13) and OUT/smollm2-config (SmolLM2's config and tokenizer, no weights: the check runs a
random model of that shape), then prints the device command. OUT is git-ignored: name it in the run's `carry`.
`--verify` installs the bundle the way the device does into a scratch venv that holds torch and transformers alone
(no Ray, as there) and imports every t2ray module the checks load: an import that crept into those paths shows
here, not on the lent machine's clock.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed's requirements and pydantic's that a torch + transformers image may lack or hold too old
PACKAGES = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "hjson",
    "einops",
    "msgpack",
    "ninja",
    "py-cpuinfo",
)
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# what gpu_check imports from t2ray, in its checks' order
CHECKED_MODULES = (
    "t2ray.models.loader",
    "t2ray.config",
    "t2ray.train.worker",
    "t2ray.rl.loop",
    "t2ray.rl.rollout",
    "t2ray.plan",
    "t2ray.generation",
    "t2ray.svf",
    "t2ray.tasks",
    "t2ray.cuda_graphs",
    "t2ray.train.engines",
)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def install_command(python: str, out: Path, target: str) -> list[str]:
    """How the device installs the bundle: no index, each package's wheel for that python from OUT/whl."""
    wheels, where = ["--find-links", str(out / "whl")], ["--target", target]
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels, *where, "deepspeed", *PACKAGES]


def build(out: Path) -> None:
    wheels = out / "whl"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in PACKAGES]
    for python in PYTHONS:  # pydantic-core, msgpack and ninja are built per CPython; the rest download once
        print(f"wheels for CPython {python}", flush=True)
        pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_17_x86_64",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "-d",
            str(wheels),
            *pins,
        )
    print(f"DeepSpeed {version('deepspeed')} as a wheel (no ops built: they JIT-compile where used)", flush=True)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), f"deepspeed=={version('deepspeed')}")
    from t2ray.models.loader import resolve  # this venv's t2ray (installed editable)

    source, config = Path(resolve("smollm2-135m", 0)), out / "smollm2-config"
    config.mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, config / name)


def verify(out: Path) -> None:
    """A scratch venv holding what the device image holds (torch, transformers at this venv's versions), the bundle
    installed as the device installs it, then every checked module imported and gpu_check's --help run."""
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as scratch:
        venv, site = Path(scratch) / "venv", Path(scratch) / "site"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        print("a scratch venv with torch and transformers only (the device image's)", flush=True)
        pins = [f"torch=={version('torch').split('+')[0]}", f"transformers=={version('transformers')}"]
        subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
        subprocess.run(install_command(python, out, str(site)), check=True)
        env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CHECKED_MODULES)
        subprocess.run([python, "-c", code], check=True, env=env)
        subprocess.run(
            [python, str(ROOT / "bench/gpu_check.py"), "--help"], check=True, env=env, stdout=subprocess.DEVNULL
        )
    print(
        f"verified: the bundle installs beside torch and transformers alone and {len(CHECKED_MODULES)} modules import"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpucheck"))
    parser.add_argument("--verify", action="store_true", help="install it here as the device would and import")
    args = parser.parse_args()
    build(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB")
    if args.verify:
        verify(args.out)
    print(
        "on the device (carry: "
        + str(args.out)
        + "):\n  "
        + shlex.join(install_command("python3", args.out, "/tmp/site"))
        + f" && PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 python3 bench/gpu_check.py --model {args.out}/smollm2-config"
        " --random --out $OUT"
    )


if __name__ == "__main__":
    main()
