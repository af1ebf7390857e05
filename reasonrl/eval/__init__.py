"""reasonrl.eval"""
