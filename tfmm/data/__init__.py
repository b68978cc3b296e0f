"""Data: the synthetic world, bring-your-own logs, and tf.data readers."""

from tfmm.data.reader import Vectors, check_records, impressions, item_categories, items, triplets

__all__ = ["Vectors", "check_records", "impressions", "item_categories", "items", "triplets"]
