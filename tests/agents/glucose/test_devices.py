import numpy as np
import pytest

from twinloop.agents.glucose.devices import PumpActuator, SensorAgent
from twinloop.agents.messages import InsulinCommand, PlantGlucose
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.pump import PumpSpec


def test_temp_basal_expires_to_the_scheduled_basal():
    pump = PumpActuator(PumpSpec(), scheduled_basal_u_per_h=1.0)
    out = pump.actuate(InsulinCommand(0.0, 3.0, 2.0, 30.0), 0.0, 40)
    assert out[0].bolus_u == pytest.approx(2.0) and all(d.bolus_u == 0 for d in out[1:])
    assert [d.basal_u for d in out[:30]] == [pytest.approx(3.0 / 60)] * 30
    assert [d.basal_u for d in out[30:]] == [pytest.approx(1.0 / 60)] * 10


def test_pump_rounds_down_to_its_increments_and_caps():
    pump = PumpActuator(PumpSpec(max_basal_u_per_h=4.0, max_bolus_u=10.0), 0.83)
    assert pump.scheduled_basal_u_per_h == pytest.approx(0.80)
    out = pump.actuate(InsulinCommand(0.0, 9.99, 12.37, 30.0), 0.0, 1)
    assert out[0].basal_u == pytest.approx(4.0 / 60) and out[0].bolus_u == pytest.approx(10.0)
    out = pump.actuate(InsulinCommand(1.0, 1.234, 1.234, 30.0), 1.0, 1)
    assert out[0].basal_u == pytest.approx(1.20 / 60) and out[0].bolus_u == pytest.approx(1.20)


def test_sensor_reads_at_its_sample_period():
    sensor = SensorAgent(CGMSpec(sample_period_min=5, noise=False), np.random.default_rng(0))
    truths = [PlantGlucose(float(t), 150.0, 140.0 + t) for t in range(0, 16)]
    readings = sensor.read_many(truths)
    assert [r.t_min for r in readings] == [0.0, 5.0, 10.0, 15.0]
    assert [r.glucose_mg_dl for r in readings] == [140.0, 145.0, 150.0, 155.0]
