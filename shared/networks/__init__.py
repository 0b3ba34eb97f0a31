"""The networks of the model factory (run config ``model``), one module each; see :mod:`shared.networks.base`.

Adding a network is one entry in :data:`NETWORKS` (its module's :class:`Network`) plus its tests.
"""

from shared.networks.attentionunet import ATTENTIONUNET
from shared.networks.base import Network
from shared.networks.dynunet import DYNUNET
from shared.networks.flexibleunet import FLEXIBLEUNET
from shared.networks.segresnet import SEGRESNET
from shared.networks.swinunetr import SWINUNETR
from shared.networks.unet import UNET

#: Network name (run config ``model``) -> what the model factory knows about it.
NETWORKS: dict[str, Network] = {"unet": UNET, "dynunet": DYNUNET, "segresnet": SEGRESNET,
                                "attentionunet": ATTENTIONUNET, "flexibleunet": FLEXIBLEUNET, "swinunetr": SWINUNETR}
