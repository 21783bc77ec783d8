"""Table 4 (iii): a low-to-high bpp curriculum: the rate penalty is progressively relaxed
(lambda goes from the large final value down to the stage-1 value); the rate target, the same
as (iv)'s, makes it end at (iv)'s bitrate (the paper compares them at 0.0593 vs 0.0604)."""

from configs import ablations


def get_config():
  start, end = ablations.stage3_anneal()
  return ablations.row(
    "strategy_low_to_high", 4, {"loss": {"anneal": {"start": end, "end": start}}}
  )
