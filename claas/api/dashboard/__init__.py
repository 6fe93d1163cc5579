"""HTML dashboards under /dashboard: the feedback log and the eval runs, for a person to read.

The API answers programs; these pages answer "what did my feedback do?". `/dashboard` lists
feedback requests newest first (status, adapter, the version each produced, timings, metrics),
and each row opens to its samples: the conversation, the response, the feedback, and the
teacher's hindsight prompt exactly as the engine tokenised it. `/dashboard/evals` lists the runs
that `claas eval` writes under `<data_dir>/evals/<run_id>/` (`summary.json`, `steps.jsonl`,
PNG plots), including runs still in progress; a half-written or malformed run is skipped with a
note, never a 500.

- `routes`: the routes, who is looking (`CurrentViewer`), signing in and out;
- `pages`: each page's template and context, rendered with the security headers;
- `feedback_log`: the feedback log's rows, from the store;
- `eval_runs`: reading the run directories of `claas eval`.
"""
