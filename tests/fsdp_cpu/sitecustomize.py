"""Test-only: FSDP over gloo processes on the CPU, for tests/test_sft_fsdp_cpu.py.

accelerate hands its FSDP plugin only to accelerator back ends (MULTI_GPU, ...): with CPU
processes it silently trains with DDP, so the FSDP path of SFT (the 13B recipe's) would never
run on a machine without GPUs. torch's FSDP 2 itself works on the CPU with gloo. With
GUIDEALIGN_TEST_CPU_FSDP=1 in the environment and this folder first on PYTHONPATH, each
training process (and torchrun) imports this at start-up and keeps the FSDP plugin on CPU
processes: everything else (transformers' Trainer, accelerate's FSDP 2 wrapping, the gathered
save, checkpoints) is the real code.

GUIDEALIGN_TEST_EXIT_AFTER_SAVE=N: the first training process exits (status 3) right after it
saved the checkpoint of step N (torchrun then stops the others), as a job lost mid-run.

GUIDEALIGN_TEST_WEIGHT_READS=FILE: each process that loads a checkpoint's weights
(transformers' ``_load_pretrained_model``) appends its LOCAL_RANK to FILE, a line each time.
"""
import os

if os.environ.get("GUIDEALIGN_TEST_CPU_FSDP") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _init = _state.AcceleratorState.__init__
    _plugin = []

    def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and not _plugin:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            _plugin.append(fsdp_plugin)
        # the state is shared and set up again later (without the plugin): keep FSDP each time
        if _plugin and getattr(self, "distributed_type", None) == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = _plugin[0]

    _state.AcceleratorState.__init__ = _init_keeping_fsdp

if os.environ.get("GUIDEALIGN_TEST_EXIT_AFTER_SAVE"):
    import transformers.trainer as _trainer
    from transformers import TrainerCallback

    _step = int(os.environ["GUIDEALIGN_TEST_EXIT_AFTER_SAVE"])

    class _ExitAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == _step and os.environ.get("RANK", "0") == "0":
                os._exit(3)

    _trainer_init = _trainer.Trainer.__init__

    def _init_with_exit(self, *args, **kwargs):
        _trainer_init(self, *args, **kwargs)
        self.add_callback(_ExitAfterSave())

    _trainer.Trainer.__init__ = _init_with_exit

if os.environ.get("GUIDEALIGN_TEST_WEIGHT_READS"):
    import transformers.modeling_utils as _mu

    _load = _mu.PreTrainedModel._load_pretrained_model

    def _load_noting_the_reader(*args, **kwargs):
        with open(os.environ["GUIDEALIGN_TEST_WEIGHT_READS"], "a") as f:
            f.write(os.environ.get("LOCAL_RANK", "-") + "\n")
        return _load(*args, **kwargs)

    _mu.PreTrainedModel._load_pretrained_model = staticmethod(_load_noting_the_reader)
