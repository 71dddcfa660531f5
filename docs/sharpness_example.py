"""The README example of cl_optim.landscape: full-batch gradient descent at the edge of stability.

python docs/sharpness_example.py   (about 12 s on 2 cores; writes docs/sharpness.png)
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import cl_optim

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x[:1000] / 16, dtype=torch.float32), torch.tensor(y[:1000])
data = [(x, y)]  # one full batch: gradient descent


def mse(out, y):  # 0.5 ||f(x) - onehot(y)||^2, averaged
    return 0.5 * ((out - nn.functional.one_hot(y, 10).float()) ** 2).sum(1).mean()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)  # stability threshold 2/lr = 20
monitor = cl_optim.landscape.SharpnessMonitor(model, data, opt, every=50, loss_fn=mse)
for _ in range(1000):
    opt.zero_grad()
    mse(model(x), y).backward()
    opt.step()
    monitor.step()
print([(row["step"], round(row["sharpness"], 1), round(row["ratio"], 2)) for row in monitor.history])
monitor.plot("docs/sharpness.png")  # the top eigenvalue rises to 2/lr and stays there
