"""edgeslim: compress trained PyTorch models for edge devices and prove every gain on ONNX Runtime.

```python
import edgeslim as es
task = es.Task(model, example_inputs=(x[:1],), calibration=(x_cal, y_cal), evaluation=(x_test, y_test))
result = es.compress(task, [es.PTQInt8Config()], out_dir="runs/mine")
```
"""

from edgeslim.config import TechniqueConfig
from edgeslim.errors import CheckpointError, ConfigError, DataError, EdgeslimError, ExportError, ModelError
from edgeslim.pipeline import RunResult, RuntimeConfig, compress
from edgeslim.quantize import PTQInt8Config, quantize_static
from edgeslim.recipe import load_recipe, parse_recipe, run_recipe
from edgeslim.registry import list_techniques, register
from edgeslim.task import ModelArtifact, Task, accuracy
from edgeslim.train import FineTune

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "EdgeslimError", "ExportError", "FineTune", "ModelArtifact",
    "ModelError", "PTQInt8Config", "RunResult", "RuntimeConfig", "Task", "TechniqueConfig", "accuracy", "compress",
    "list_techniques", "load_recipe", "parse_recipe", "quantize_static", "register", "run_recipe",
]
