"""Which post-training method, with which technique, and why: `advise(profile)`.

Decision rules are data (rules.yaml), each citing its principle; hardware fit and cost come from
`posttrain.estimator`. Plain Python: importing it loads no torch.
"""

from posttrain.advisor.core import Advice, advise
from posttrain.advisor.profile import KEYS, Profile, load_profile, profile_from_dict

__all__ = ["KEYS", "Advice", "Profile", "advise", "load_profile", "profile_from_dict"]
