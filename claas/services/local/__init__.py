"""The local training service: Tinker's client API, in-process, on transformers + PEFT + torch.

claas's SDPO engine is written once against the Tinker SDK; this package implements the part of
that surface the engine uses, taking and returning the real `tinker.types` objects and Tinker's
own futures, so the same engine runs on a laptop CPU, one GPU and in every test. Client files
are named after the SDK's (`tinker/lib/public_interfaces/`):

| file | holds |
|---|---|
| `service_client.py` | `LocalServiceClient`, `LocalRestClient` |
| `training_client.py` | `LocalTrainingClient`: one LoRA adapter, its AdamW state, custom losses |
| `sampling_client.py` | `LocalSamplingClient`: sampling and prompt scoring |
| `responses.py` | Tinker's `SampleResponse` layout |
| `scheduler.py` | `ContinuousDecoder`: chats batched continuously, in slices and at yield points |
| `running_batch.py` | `RunningBatch`: the running chats' prefill and decode forwards |
| `kv_rows.py` | the running rows and their shared, left-padded KV cache |
| `lora_term.py` | each row's own LoRA term in a batched forward (stacked by rank, `bmm`) |
| `packed.py` | the base linears on oneDNN-packed weights for batched forwards |
| `losses.py` | Tinker's `cross_entropy` and `importance_sampling`, as plain sums |
| `host.py` | `AdapterHost`: the base model and its named LoRA adapters; `shared_model` |
| `worker.py` | `ModelWorker`: the one thread all model work runs on, in order |
| `decoding.py` | torch kernels: log-probs, prompt scoring, sampling |
| `checkpoints.py` | `local://` paths and atomic PEFT checkpoint directories |

    host = AdapterHost(load_model("SmolLM2-135M-Instruct", cache))  # its owner closes it
    service = LocalServiceClient(host, storage_dir)  # or (loaded_model, ...): owns its host
    trainer = await service.create_lora_training_client(service.base_model, rank=16)
    fwd = trainer.forward_backward(datums, "cross_entropy")
    opt = trainer.optim_step(types.AdamParams(learning_rate=1e-4))
    await fwd, await opt
"""

from claas.services.local.host import AdapterHost, shared_model
from claas.services.local.sampling_client import LocalSamplingClient
from claas.services.local.service_client import LocalRestClient, LocalServiceClient
from claas.services.local.training_client import LocalTrainingClient

__all__ = [
    "AdapterHost",
    "LocalRestClient",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTrainingClient",
    "shared_model",
]
