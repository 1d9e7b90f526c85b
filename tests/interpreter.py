"""Test-only speed-up of Triton's interpreter (TRITON_INTERPRET=1): applied by conftest.py in the test session
and by the distributed tests' worker processes, which do not import conftest."""
import inspect
import os


def patch_language_once_per_launch():
    """Triton's interpreter patches the language modules a kernel's globals name (triton.language, or .core for its
    own standard library) for a launch, then again on every nested @triton.jit call it runs (inspect.getmembers over
    the modules: over half of our kernels' interpreted run time), though the modules are already patched for that
    launch. Here a nested call patches only modules not yet patched in the launch: the same interpreted semantics,
    a fraction of the host time. Left as it is if the interpreter's internals differ from what this expects, and
    without TRITON_INTERPRET."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti
    patch, grid_call = getattr(ti, "_patch_lang", None), getattr(getattr(ti, "GridExecutor", None), "__call__", None)
    if patch is None or grid_call is None or not hasattr(ti, "_LangPatchScope") or getattr(patch, "once", False):
        return
    patched: set = set()  # ids of the language modules the running launch has patched
    langs_of: dict = {}

    def _patch_lang(fn):
        if fn not in langs_of:
            langs_of[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs_of[fn] <= patched:
            return ti._LangPatchScope()  # nothing to restore: the launch restores its own patches
        patched.update(langs_of[fn])
        return patch(fn)

    def __call__(self, *args, **kwargs):
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.clear()

    _patch_lang.once = True
    ti._patch_lang, ti.GridExecutor.__call__ = _patch_lang, __call__
