"""plait training: making adapters.

- `training.base`     find, load and fingerprint the frozen base model
- `training.methods`  the adapter kinds, one module each, registered by name (each owns its config,
                     artifact format, detection and serving stacker)
- `training.data`     domain data: formats, checks, eval split, fingerprint, tokenization
- `training.trainer`  the incremental trainer (`train_domain` over the `DomainRecipe` phases, `TrainConfig`)
- `training.evaluation`  precision and the token loss (`evaluate`, `token_loss_sum`, `resolve_dtype`)
- `training.precision`  what `auto` means here: fp32 or bf16, timed once per machine and workload, cached
- `training.checkpoints`  crash-safe checkpoints and the per-adapter checkpoint lock
- `training.load`     a registered version back onto its base (`load_version`, `eval_loss`; for
                     Python callers and tests: serving goes through `routing.engine`)
- `training.merge`    several LoRAs merged into one with peft (`merge_loras`: cat, ties, linear)
"""
