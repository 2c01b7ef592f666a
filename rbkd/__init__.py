"""rbkd"""
