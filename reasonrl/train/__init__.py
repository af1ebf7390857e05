"""reasonrl.train"""
