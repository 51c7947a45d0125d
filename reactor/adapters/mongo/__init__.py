"""MongoDB adapters: the campaigns store, the deliveries ledger, the change feed and the
recipients lookup. Nothing above the adapters touches a collection."""

from .actions import MongoRecipientActions
from .audiences import MongoAudiences
from .budgets import MongoBudgets
from .campaigns import MongoCampaignStore
from .claims import SCHEDULE_PROJECTION
from .feed import MongoChangeFeed
from .feedback import MongoFeedback
from .ledger import MongoLedger
from .recipients import MongoRecipients
from .shards import MongoShards
from .suppressions import MongoSuppressions

__all__ = [
    "SCHEDULE_PROJECTION",
    "MongoAudiences",
    "MongoBudgets",
    "MongoCampaignStore",
    "MongoChangeFeed",
    "MongoFeedback",
    "MongoLedger",
    "MongoRecipientActions",
    "MongoRecipients",
    "MongoShards",
    "MongoSuppressions",
]
