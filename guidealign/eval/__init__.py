"""eval: guided against unguided responses on a benchmark, judged by local models and
reported (``guidealign eval``; the stage function is ``guidealign.eval.run.run_eval``)."""
