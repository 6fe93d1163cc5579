"""`claas eval`: an automated feedback loop that measures what feedback teaches, and its cost.

A simulated user teaches preferences (`concise`, `no_emoji`, `identity`, or their own YAML) to
fresh adapters on a claas server through its public HTTP API alone: it chats, sends the
preference's feedback on a batch of answers, and after every training step measures, on
held-out probes, compliance (a verifier's score), the log-prob margin of a preferred over a
dispreferred answer, capability on a fixed question set (as a ratio to the baseline), collapse
indicators (token entropy, self-ROUGE-L across seeds, distinct-n, repeated 3-grams, length
drift) and the engine's own training metrics. With `continual: true` the preferences are taught
one after another to one adapter, a preference may come back in a later stage, and each one's
retention is reported.

    claas eval num_steps=10 preferences=[concise] training.use_topk_divergence=false
    claas eval --url http://gpu-box:8000 --config eval.yaml
    claas eval continual=true preferences=[concise,no_emoji,identity,concise]
    claas eval compare RUN_A RUN_B
    claas eval seeds RUN_A RUN_B RUN_C --out seeds.json

A run directory (`<data_dir>/evals/<run_id>/` by default) holds `config.yaml` (resolved),
`steps.jsonl` (one line per stage and step, step 0 the baseline), `summary.json`
(rewritten atomically after every step) and four PNG plots; `claas.runs` is their format,
which the dashboard reads too, and `claas.eval.runner` says how a killed run resumes. The
submodules are imported where used (`claas.eval.runner.run_eval`, `claas.eval.compare`,
`claas.eval.seeds`), so that `claas --help` does not load matplotlib.
"""
