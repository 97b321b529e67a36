"""Machine code for ingest's kernels (``blake2_llvm``, ``scan_llvm``, ``flatjson_llvm``), built with llvmlite.

``load(what, make, check, instead)`` gives a kernel once per process (thread-safe), or None
where it cannot be had: no llvmlite, or a build or self-test that failed (said once, as a
warning naming what runs instead); ``loaded(what)`` says whether asking now would wait.
``build(ir_module, source, names)`` gives the machine code of an ``llvmlite.ir`` module for this
machine's CPU, and each named function's address (keep the returned owner alive).

Cached in ``__pycache__`` beside ``source``, keyed by that file's bytes, llvmlite's version and
the CPU (so only the first run on a machine compiles; without a writable cache every run does):

- the object code (``.o``), which LLVM's JIT loads;
- where a linker is on PATH (``ld``), a shared library linked from it (``.so``), which later
  runs load with ``ctypes`` alone: no llvmlite, no JIT (~30 ms of a run's start, which the
  first block waited for). Its key is read without llvmlite: the CPU's model and flags from
  ``/proc/cpuinfo`` (a library built on one kind of node is not loaded on another).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Callable

_LOCK = threading.Lock()
_LOADED: dict = {}   # what -> the kernel's function(s), or None
_ENGINES: list = []  # the engines that own the code of every kernel handed out (kept for good)


def load(what: str, make: Callable, check: Callable, instead: str):
    """The kernel ``what`` ("blake2b", "line-end"...): ``make()`` gives (engine, functions) and
    ``check(functions)`` raises unless they compute what the Python code does. Built on first
    use, thread-safe; None when llvmlite is missing, or when the build or the check fails (a
    warning says so once, and that ``instead`` runs: e.g. "hashing with hashlib")."""
    if what in _LOADED:  # loaded: no wait for the lock, which a build of another kernel holds
        return _LOADED[what]
    with _LOCK:
        if what not in _LOADED:
            fns = None
            try:
                engine, fns = make()
                _ENGINES.append(engine)
                check(fns)
            except ImportError:
                fns = None
            except Exception as e:  # noqa: BLE001 - no code generation here: the Python code runs
                logging.getLogger(__name__).warning("ingest: the compiled %s kernel is not available (%s: %s); %s",
                                                    what, type(e).__name__, e, instead)
                fns = None
            _LOADED[what] = fns
        return _LOADED[what]


def loaded(*what: str) -> bool:
    """Whether each kernel named has been loaded (or has failed to), so that asking for it now
    does not wait for a build another thread is running."""
    return all(w in _LOADED for w in what)


def cache_file(llvm, source: Path, cpu: str, features: str) -> Path:
    key = hashlib.sha256(b"\0".join([source.read_bytes(), repr(llvm.llvm_version_info).encode(),
                                     llvm.get_process_triple().encode(), cpu.encode(), features.encode(), b"pic"]))
    return source.parent / "__pycache__" / f"{source.stem}-{key.hexdigest()[:20]}.o"


def _cpu_id() -> str | None:
    """This machine's CPU as ``/proc/cpuinfo`` shows its first processor (model and feature
    flags), or None where there is no such file (then no shared library is used)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16).split("\n\n")[0]
    except OSError:
        return None
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in
            ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU implementer", "CPU part")]
    return "\n".join(keep) or None


def shared_library_file(source: Path) -> Path | None:
    """Where the shared library of ``source``'s kernel is cached for this machine (None: not
    on this platform)."""
    cpu = _cpu_id()
    if cpu is None or platform.system() != "Linux":
        return None
    import llvmlite  # (its version only: the package, not its binding, ~0.2 ms)

    key = hashlib.sha256(b"\0".join([source.read_bytes(), llvmlite.__version__.encode(),
                                     platform.machine().encode(), cpu.encode(), b"pic"]))
    return source.parent / "__pycache__" / f"{source.stem}-{key.hexdigest()[:20]}.so"


def _load_shared(path: Path | None, names: list[str]):
    """(library, {name: address}) from a cached shared library, or None (none cached, or one
    that does not load: removed, so that it is linked again)."""
    if path is None or not path.is_file():
        return None  # (also where libraries cannot be loaded here: ``_link_shared`` left a note)
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        return lib, {n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names}
    except (OSError, AttributeError) as e:
        logging.getLogger(__name__).warning("ingest: the cached kernel library %s does not load (%s); "
                                            "building it again", path, e)
        _remove(path)
        return None


def _link_shared(obj: bytes, path: Path | None) -> None:
    """Link the (position-independent) object code into the shared library at ``path``, where
    a linker is on PATH; nothing otherwise (later runs then load the object with the JIT). A
    library that links but does not load here (a file system mounted noexec) is not kept: a
    note (``.nolib``) beside it stops later runs from linking it again."""
    ld = shutil.which("ld")
    if path is None or ld is None or path.with_suffix(".nolib").exists():
        return
    tag = f"{os.getpid()}.{threading.get_ident()}"
    o, tmp = path.with_name(f".{path.stem}.{tag}.o"), path.with_name(f".{path.name}.{tag}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        o.write_bytes(obj)
        subprocess.run([ld, "-shared", "-z", "noexecstack", "-o", str(tmp), str(o)], check=True,
                       capture_output=True, timeout=60)
        try:
            ctypes.CDLL(str(tmp), mode=os.RTLD_LOCAL)  # (loaded once more later: dlopen counts)
        except OSError as e:
            path.with_suffix(".nolib").write_text(f"{e}\n")
            raise
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        logging.getLogger(__name__).info("ingest: no shared library of %s (%s): its kernel loads with the JIT",
                                         path.name, e)
    finally:
        _remove(o)
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove ``path`` where it is there and can be: on a read-only mount even a file that is
    not there gives an error (EROFS, not ENOENT), which must not cost the kernel."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def build(ir_module: Callable, source: Path, names: list[str], optimize: bool = False):
    """(owner, {name: address}) for the functions ``names`` of ``ir_module()`` (called only when
    the cache has no code for it); the owner (a loaded library or the JIT's engine) holds the
    code: keep it alive. ``optimize``: run LLVM's O2 pass pipeline on the IR first (for kernels
    written with stack variables, which it puts in registers), where llvmlite has the pass
    builder (0.44 on); else the code generator's own optimization only."""
    so = shared_library_file(source)
    got = _load_shared(so, names)
    if got is not None:
        return got
    import llvmlite.binding as llvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            llvm.initialize()  # llvmlite < 0.45 needs it; later ones initialize themselves (and raise)
        except RuntimeError:
            pass
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    # position-independent code: the same object loads in the JIT and links into a library
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=2, reloc="pic")
    cache = cache_file(llvm, source, cpu, features)
    ee = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
    try:
        obj = cache.read_bytes()
    except OSError:
        obj = None
    if obj is None:
        mod = llvm.parse_assembly(str(ir_module()))
        mod.verify()
        if optimize and hasattr(llvm, "create_pass_builder"):
            pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2, size_level=0))
            pb.getModulePassManager().run(mod, pb)
        # without ``optimize`` no IR pass pipeline: those kernels are written as the loops they
        # should be, and the code generator's own optimization (opt=2) suffices
        obj = tm.emit_object(mod)
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(obj)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only install: compile every run
    if so is not None and not so.exists():
        _link_shared(obj, so)
    ee.add_object_file(llvm.ObjectFileRef.from_data(obj))
    ee.finalize_object()
    addrs = {}
    for name in names:
        addrs[name] = ee.get_function_address(name)
        if not addrs[name]:
            raise RuntimeError(f"{name} not found in the compiled object")
    return ee, addrs
