"""Placeholder, filled below."""
Critic = RewardModel = ValueHead = make_critic = reward_model_from_pretrained = None
