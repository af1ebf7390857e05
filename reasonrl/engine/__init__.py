"""reasonrl.engine"""
