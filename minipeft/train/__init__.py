"""The training side: data, batches, the loop's pieces, resumable run state, reporting.

The scripts read it as one name, `from minipeft import train`, then `train.Batches`, `train.warmup_cosine`, ...:
each of these is defined in the file named beside it.
"""

from ..methods.fingerprints import fingerprint_digest  # one sha256 of the frozen base, kept in a checkpoint
from .batches import Batches, pack_rows, pad_batch
from .data import FOX_PROMPT, FOX_TARGET, FOX_VARIANTS, Filters, describe, load_corpus
from .distributed import DataParallelLoss, collective_failure, start_processes, world_from_environment
from .loop import (accumulate_gradients, clip_and_check, compute_dtype, heldout_loss, micro_batch_seed, peak_memory_mb,
                   warmup_cosine)
from .method_choice import CHOICES, FLAGS, add_method_arguments, between_steps, choose_method, method_settings
from .reporting import (check_positive, check_weights, plot_losses, prepare_output_dir, prompt_neighbours,
                        write_report, write_samples)
from .run import Run, check_resume
from .run_state import CHECKPOINT_FILE, checkpoint_settings
