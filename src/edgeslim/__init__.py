"""edgeslim: compress trained PyTorch models for edge devices and prove every gain on ONNX Runtime.

```python
import edgeslim as es
task = es.Task(model, example_inputs=(x[:1],), calibration=(x_cal, y_cal), evaluation=(x_test, y_test))
result = es.compress(task, [es.PTQInt8Config()], out_dir="runs/mine")
```
"""

from edgeslim.cluster import ClusterConfig
from edgeslim.config import TechniqueConfig
from edgeslim.distill import DistillConfig
from edgeslim.errors import (CheckpointError, ConfigError, DataError, EdgeslimError, ExportError, ModelError,
                             NumericalError, OutputError)
from edgeslim.lowrank import LowRankConfig
from edgeslim.pipeline import RunResult, RuntimeConfig, compress
from edgeslim.prune import PruneChannelsConfig, PruneMagnitudeConfig, PruneTransformerConfig
from edgeslim.qat import QATConfig
from edgeslim.quantize import (DynamicInt8Config, MixedPrecisionConfig, PTQInt8Config, WeightOnlyConfig,
                               quantize_static)
from edgeslim.recipe import load_recipe, parse_recipe, run_recipe
from edgeslim.registry import list_techniques, register
from edgeslim.task import ModelArtifact, Task, accuracy
from edgeslim.train import FineTune

__version__ = "0.1.0"

# Every registered technique's config is here, so ``es.MixedPrecisionConfig(...)`` works like
# ``es.PTQInt8Config(...)`` (a test keeps this list equal to the registry's).
__all__ = [
    "CheckpointError", "ClusterConfig", "ConfigError", "DataError", "DistillConfig", "DynamicInt8Config",
    "EdgeslimError", "ExportError", "FineTune", "LowRankConfig", "MixedPrecisionConfig", "ModelArtifact",
    "ModelError", "NumericalError", "OutputError", "PTQInt8Config", "PruneChannelsConfig", "PruneMagnitudeConfig",
    "PruneTransformerConfig", "QATConfig", "RunResult", "RuntimeConfig", "Task", "TechniqueConfig", "WeightOnlyConfig",
    "accuracy", "compress", "list_techniques", "load_recipe", "parse_recipe", "quantize_static", "register",
    "run_recipe",
]
