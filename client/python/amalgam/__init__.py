"""Python client of the Amalgam model-merging service.

    import amalgam
    client = amalgam.Client("127.0.0.1:50051")
    w = client.upload_weights(model.state_dict())
    job = client.merge([w1, w2, w3], method="regmean", grams=[g1, g2, g3])
    merged = job.state_dict()

Statistics for RegMean and Fisher merging come from ``amalgam.stats``.
"""

from amalgam import stats
from amalgam.client import AmalgamError, Client, Job

__all__ = ["AmalgamError", "Client", "Job", "stats"]
__version__ = "0.1.0"
