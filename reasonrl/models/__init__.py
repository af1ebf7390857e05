"""reasonrl.models"""
