"""Machine code for ingest's kernels (``blake2_llvm``, ``scan_llvm``, ``flatjson_llvm``), built with llvmlite.

``load(what, make, check, instead)`` gives a kernel once per process (thread-safe), or None
where it cannot be had: no llvmlite, or a build or self-test that failed (said once, as a
warning naming what runs instead). ``build(ir_module, source, names)`` compiles an ``llvmlite.ir`` module for this machine's CPU and
returns the engine (it owns the code: keep it alive) and each named function's address. The
object code is cached in ``__pycache__`` beside ``source`` (keyed by that file's bytes, LLVM's
version, the target and the CPU), so only the first run on a machine compiles; without a
writable cache it compiles every run.
"""
from __future__ import annotations

import hashlib
import logging
import os
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


def cache_file(llvm, source: Path, cpu: str, features: str) -> Path:
    key = hashlib.sha256(b"\0".join([source.read_bytes(), repr(llvm.llvm_version_info).encode(),
                                     llvm.get_process_triple().encode(), cpu.encode(), features.encode()]))
    return source.parent / "__pycache__" / f"{source.stem}-{key.hexdigest()[:20]}.o"


def build(ir_module: Callable, source: Path, names: list[str], optimize: bool = False):
    """(engine, {name: address}) for the functions ``names`` of ``ir_module()`` (called only when
    the cache has no object for it). ``optimize``: run LLVM's O2 pass pipeline on the IR first
    (for kernels written with stack variables, which it puts in registers), where llvmlite has
    the pass builder (0.44 on); else the code generator's own optimization only."""
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
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=2)
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
    ee.add_object_file(llvm.ObjectFileRef.from_data(obj))
    ee.finalize_object()
    addrs = {}
    for name in names:
        addrs[name] = ee.get_function_address(name)
        if not addrs[name]:
            raise RuntimeError(f"{name} not found in the compiled object")
    return ee, addrs
