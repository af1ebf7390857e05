"""reasonrl.rl"""
