"""streamlearn: online learning from Kafka event streams, served over HTTP.

The core (this package, minus ``streamlearn.services``) is pure: it holds the
feature pipeline, scaler, models, metrics, drift monitors and snapshot format,
and does no network I/O.
"""

from streamlearn.config import ModelSpec
from streamlearn.features import FeatureBatch, Vectorizer
from streamlearn.scaler import RunningStandardScaler

__all__ = ["FeatureBatch", "ModelSpec", "RunningStandardScaler", "Vectorizer", "__version__"]

__version__ = "0.1.0"
