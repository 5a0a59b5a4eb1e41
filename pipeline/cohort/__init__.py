"""Many LoRAs per pass: K adapters trained and scored in the same forward passes over one frozen base.

- `layers`: `CohortLoraLinear` (the K low-rank paths of one Linear layer as batched matrix
  products, each input row routed to its adapter) and `cohort_layers` (attach / detach them);
- `peft_io`: an adapter's factors initialised exactly as peft initialises them, and exported as
  an ordinary peft adapter folder;
- `sizing`: the cohort size K chosen from free memory.
"""

from storage.errors import DomainError


class CohortError(DomainError):
    """LoRAs that cannot share a cohort as the manifest asks: a target module that is not a Linear
    layer, jobs in different precisions or on different modules, an adapter folder that is not a plain peft LoRA.
    The message says which setting to change (often `execution.cohort_size: 1`)."""
