"""The package's layering: lower layers never import upper ones, and light imports stay light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llava_jax")
# A folder's modules may not import these (anywhere in the file, lazily or not).
FORBIDDEN = {
    "parallel": ("llava_jax.train", "llava_jax.inference", "llava_jax.weights"),
    "models": ("llava_jax.train", "llava_jax.inference", "llava_jax.parallel", "llava_jax.data"),
    "data": ("llava_jax.train", "llava_jax.inference", "llava_jax.parallel", "llava_jax.models"),
}


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
    return names


def test_lower_layers_do_not_import_upper_ones():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        for name in sorted(os.listdir(os.path.join(PACKAGE, folder))):
            if name.endswith(".py"):
                path = os.path.join(PACKAGE, folder, name)
                bad += [f"llava_jax/{folder}/{name} imports {m}" for m in sorted(_imports(path))
                        if m.startswith(forbidden)]
    assert not bad, "\n".join(bad)


def test_package_and_data_modules_import_without_jax_or_flax():
    """What a Grain worker process unpickles (the data modules) needs neither jax nor flax from us."""
    code = ("import sys, llava_jax, llava_jax.data.records, llava_jax.data.templates, llava_jax.data.tokenizer, "
            "llava_jax.data.image; print(sorted(m for m in ('jax', 'flax') if m in sys.modules)); "
            # The public names still resolve (lazily).
            "print(llava_jax.load_pretrained.__name__, llava_jax.LlavaConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "load_pretrained LlavaConfig"], out.stdout
