"""SDPO, the learning core: feedback batch in, trained adapter checkpoint out.

- `prompts`: the student's chat prompt and the teacher's hindsight prompt;
- `divergence`: the math, defined once: top-K generalised JS with a tail bucket, its gradient,
  scalar-KL advantages, importance ratios, k3;
- `datums`: scored tokens to Tinker datums and loss terms;
- `config`: `TrainingConfig`, `FeedbackSample`, the learning-rate rule, `TrainedCheckpoint`;
- `strategies`: the two divergences as strategy objects (top-K GJS, scalar KL);
- `engine`: `SDPOEngine.distill`: teacher scoring, student steps, saved checkpoints.

Nothing here imports the store, the API or the local service: the engine talks to a training
service only through `claas.services.protocol`.
"""
