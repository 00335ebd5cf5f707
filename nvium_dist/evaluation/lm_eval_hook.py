"""Makes the plain `lm_eval --model nvium ...` command find the `nvium` model type.

lm-evaluation-harness 0.4 looks models up in a registry that only its own modules fill (no plugin entry
points), so this environment gets a site hook: `python -m nvium_dist.evaluation.lm_eval_hook install`
(run by scripts/setup.sh) copies this file into site-packages as `nvium_lm_eval_hook.py` and adds
`nvium_lm_eval.pth`, whose one line calls `install()` at interpreter start. That puts a finder on
sys.meta_path which does nothing until `lm_eval.models` is imported; then it adds the lazy registry entry
"nvium" -> nvium_dist.evaluation.lm_eval_model:NviumLM (imported only when a run asks for it). Standard
library only, so the hook costs every other Python process one small module import.
"""
from __future__ import annotations

import argparse
import importlib.abc
import shutil
import sys
import sysconfig
from pathlib import Path

TARGET = "nvium_dist.evaluation.lm_eval_model:NviumLM"
WATCHED = "lm_eval.models"
HOOK_MODULE = "nvium_lm_eval_hook"
PTH_FILE = "nvium_lm_eval.pth"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "nvium" not in model_registry:
        model_registry.register("nvium", target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of lm_eval.models, then registers `nvium`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(type(finder).__name__ == _Finder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if WATCHED in sys.modules:
        register()


def install_files(site_dir: Path) -> list[Path]:
    hook, pth = site_dir / f"{HOOK_MODULE}.py", site_dir / PTH_FILE
    shutil.copyfile(__file__, hook)
    pth.write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n")
    return [hook, pth]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Install or remove the site hook that registers lm_eval's "
                                                 "`nvium` model type (see the module docstring)")
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--site-dir", default=sysconfig.get_paths()["purelib"],
                        help="site-packages directory (default: this interpreter's)")
    args = parser.parse_args(argv)
    site_dir = Path(args.site_dir)
    if args.action == "install":
        for path in install_files(site_dir):
            print(f"wrote {path}")
    else:
        for path in (site_dir / f"{HOOK_MODULE}.py", site_dir / PTH_FILE):
            if path.exists():
                path.unlink()
                print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
