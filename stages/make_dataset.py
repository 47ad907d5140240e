"""Write the embedded corporate Q&A dataset (data/raw/corporate_qa.jsonl).

The dataset is generated, not scraped: every fact about the fictional company Contoso is written
once below, and each fact is asked several ways (paraphrase templates) with one answer, so the
answers stay consistent across paraphrases. The output is deterministic (a fixed seed shuffles
the order), so `python -m stages.make_dataset --check` can verify the committed file.

Run:  python -m stages.make_dataset [--out data/raw/corporate_qa.jsonl] [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SYSTEM_PROMPTS = (
    "You are a helpful corporate AI assistant for Contoso. Answer questions about internal "
    "processes, application workflows, workplace policies and technical documentation "
    "accurately and concisely.",
    "You are Contoso's internal help desk assistant. Give short, accurate answers based on "
    "company policy.",
    "You are a helpful corporate assistant.",
)

# --- job codes -------------------------------------------------------------------------------
JOB_CODES = {
    "PM": ("Full Time Employee", "eligible for the full benefits package"),
    "FC": ("Full Time Contractor", "not eligible for company benefits; benefits come from the contracting agency"),
    "PT": ("Part Time Employee", "eligible for prorated benefits when scheduled for at least 20 hours a week"),
    "PC": ("Part Time Contractor", "not eligible for company benefits"),
    "IN": ("Intern", "eligible for the intern wellness stipend but not for the full benefits package"),
    "TE": ("Temporary Employee", "eligible for statutory benefits only"),
    "SE": ("Seasonal Employee", "eligible for statutory benefits only"),
    "CN": ("Consultant", "not eligible for company benefits"),
    "VE": ("Vendor Employee", "not eligible for company benefits"),
    "RR": ("Retiree Rehire", "eligible for prorated benefits and keeps retiree medical coverage"),
    "FX": ("Fixed Term Employee", "eligible for the full benefits package for the length of the contract"),
    "AP": ("Apprentice", "eligible for the full benefits package and the apprenticeship training budget"),
    "EX": ("Executive", "eligible for the executive benefits package"),
    "GR": ("Graduate Trainee", "eligible for the full benefits package"),
    "SB": ("Sabbatical Leave Holder", "eligible for continued medical coverage during the sabbatical"),
    "WS": ("Working Student", "eligible for the student benefits package"),
    "OC": ("On-Call Employee", "eligible for statutory benefits and on-call allowances"),
    "BD": ("Board Member", "not eligible for employee benefits"),
    "SC": ("Secondee", "covered by the benefits of the home organisation"),
    "ST": ("Student Placement", "eligible for the student benefits package"),
}
JOB_CODE_QUESTIONS = (
    "What is {code} job code?",
    "What does the {code} job code mean?",
    "What does job code {code} indicate?",
    "My HR profile shows the job code {code}. What does that stand for?",
    "Can you explain the {code} job code?",
    "Which employment type does the {code} code represent?",
    "I'm filling in a form that asks for job code {code}. What type of worker is that?",
)
JOB_CODE_BENEFIT_QUESTIONS = (
    "Are workers with the {code} job code eligible for benefits?",
    "Does the {code} job code come with benefits?",
    "What benefits does someone with job code {code} get?",
    "Is a {code} worker covered by the company benefits package?",
)
JOB_CODE_PAIRS = (("PM", "FC"), ("PM", "PT"), ("FC", "PC"), ("TE", "SE"), ("IN", "AP"),
                  ("CN", "VE"), ("PM", "FX"), ("GR", "IN"), ("WS", "ST"), ("PT", "PC"))
JOB_CODE_PAIR_QUESTIONS = (
    "What is the difference between {a} and {b} job codes?",
    "How do the {a} and {b} job codes differ?",
    "Can you compare job codes {a} and {b}?",
)

# --- leave -------------------------------------------------------------------------------------
LEAVE = {
    "annual leave": ("25 days of annual leave per calendar year, rising to 28 days after 5 years of service",
                     "at least 14 days in advance in PeopleHub"),
    "sick leave": ("10 paid sick days per calendar year",
                   "by notifying your manager before 10 AM on the first day of absence and logging it in PeopleHub"),
    "primary caregiver parental leave": ("16 weeks of fully paid parental leave",
                                         "at least 8 weeks before the expected start date in PeopleHub"),
    "secondary caregiver parental leave": ("4 weeks of fully paid parental leave",
                                           "at least 4 weeks before the expected start date in PeopleHub"),
    "bereavement leave": ("5 paid days for an immediate family member and 2 paid days for an extended family member",
                          "by telling your manager and logging it in PeopleHub when you return"),
    "jury duty leave": ("full pay for the whole jury service",
                        "by uploading the court summons to PeopleHub within 5 days of receiving it"),
    "sabbatical leave": ("4 weeks of paid sabbatical after 5 years of continuous service",
                         "at least 3 months in advance with director approval in PeopleHub"),
    "volunteer leave": ("2 paid volunteer days per calendar year",
                        "at least 7 days in advance in PeopleHub under Volunteer Leave"),
    "marriage leave": ("3 paid days of marriage leave",
                       "at least 14 days in advance in PeopleHub"),
    "study leave": ("up to 5 paid days per year for exams of an approved course",
                    "at least 30 days in advance with the course enrolment attached in PeopleHub"),
    "moving day leave": ("1 paid day when you move home",
                         "at least 7 days in advance in PeopleHub"),
    "unpaid leave": ("up to 3 months of unpaid leave with manager and HR approval",
                     "at least 30 days in advance in PeopleHub"),
}
LEAVE_ENTITLEMENT_QUESTIONS = (
    "How much {leave} do I get?",
    "What is the {leave} entitlement?",
    "How many days of {leave} are employees entitled to?",
    "What does the company policy say about {leave} allowance?",
    "What is my {leave} allowance?",
)
LEAVE_REQUEST_QUESTIONS = (
    "How do I request {leave}?",
    "What is the process for taking {leave}?",
    "How far in advance must I apply for {leave}?",
    "Where do I submit a request for {leave}?",
)

# --- expenses ----------------------------------------------------------------------------------
EXPENSE_LIMITS = {
    "hotel": "Hotel stays are reimbursed up to $200 per night, or $300 per night in London, New York and Tokyo",
    "meals": "Meals on business travel are reimbursed up to a daily per diem of $75",
    "airfare": "Flights under 6 hours are booked in economy class; flights of 6 hours or more may be booked in premium economy",
    "mileage": "Business use of a personal car is reimbursed at $0.67 per mile",
    "taxi": "Taxis and ride-sharing are reimbursed when public transport is impractical, with a receipt for every ride",
    "client entertainment": "Client entertainment is reimbursed up to $150 per person and needs director pre-approval above $1,000 in total",
    "home internet": "Remote employees are reimbursed up to $50 per month for home internet",
    "conference fees": "Conference fees are reimbursed when the conference was pre-approved by your manager in ExpenseFlow",
    "training courses": "Training courses are reimbursed up to $2,000 per year from your learning budget",
    "mobile phone": "A business mobile phone plan is reimbursed up to $40 per month",
    "home office equipment": "Home office equipment is reimbursed once up to $500 when you start working remotely",
    "visa fees": "Visa fees for business travel are reimbursed in full",
}
EXPENSE_LIMIT_QUESTIONS = (
    "What is the expense limit for {item}?",
    "How much can I claim for {item}?",
    "What is the reimbursement policy for {item}?",
    "Will the company pay for {item} and up to what amount?",
    "Is there a cap on {item} expenses?",
)
EXPENSE_RULES = [
    (("When do I need a receipt for an expense?", "Do I need receipts for small expenses?",
      "Which expenses require a receipt?"),
     "Receipts are required for every expense above $25."),
    (("How long do I have to submit an expense claim?", "What is the deadline for submitting expenses?",
      "Can I submit an expense report from two months ago?"),
     "Expense claims must be submitted in ExpenseFlow within 30 days of the expense date."),
    (("Who approves my expense report?", "Who needs to approve expense claims?",
      "What is the approval chain for expenses?"),
     "Your line manager approves expense claims up to $2,500; claims above $2,500 also need director approval."),
    (("What do I do if I lost a receipt?", "I lost my receipt, can I still claim the expense?",
      "How do I claim an expense without a receipt?"),
     "Submit a missing receipt declaration in ExpenseFlow; it is accepted for up to two expenses per year."),
    (("When are expenses reimbursed?", "How long does expense reimbursement take?",
      "When will I get paid back for my expenses?"),
     "Approved expenses are reimbursed with the next payroll run, usually within 10 business days."),
    (("Can I use my corporate card for personal purchases?", "Is personal spending allowed on the corporate card?",
      "What happens if I put a personal expense on the company card?"),
     "No. The corporate card is for business expenses only; personal charges must be repaid within 15 days."),
    (("How are expenses in foreign currency reimbursed?", "Which exchange rate is used for foreign expenses?",
      "I paid in euros on a trip, how is that converted?"),
     "Foreign currency expenses are converted at the ExpenseFlow exchange rate on the date of the expense."),
    (("Is alcohol reimbursable?", "Can I expense drinks at dinner?", "Does the company pay for alcohol on expenses?"),
     "Alcohol is reimbursable only as part of pre-approved client entertainment."),
]

# --- IT access ---------------------------------------------------------------------------------
IT_SYSTEMS = {
    "VPN": ("your manager", 1),
    "GitHub organisation": ("the engineering lead of your team", 1),
    "production database": ("the data owner and the security team, after the data handling training", 3),
    "Salesforce": ("the sales operations team", 2),
    "shared finance drive": ("the finance controller", 2),
    "Azure subscription": ("the cloud platform team", 2),
    "Jira": ("your manager", 1),
    "Confluence": ("your manager", 1),
    "PeopleHub admin console": ("the HR systems team", 3),
    "data warehouse": ("the data owner", 2),
    "Kubernetes cluster": ("the platform engineering team, after the on-call training", 3),
    "payroll system": ("the payroll manager", 5),
    "customer support tool": ("the support operations team", 1),
    "build servers": ("the DevOps team", 2),
}
IT_ACCESS_QUESTIONS = (
    "How do I get access to the {system}?",
    "What is the process to request {system} access?",
    "Who approves access to the {system}?",
    "How long does it take to get {system} access?",
    "I need permissions for the {system}. What should I do?",
    "Can you tell me how to request access to the {system}?",
)
IT_HOWTO = [
    (("How do I reset my password?", "I forgot my password, what should I do?",
      "What is the process for a password reset?", "How can I change my network password?"),
     "Reset your password at the self-service portal in AccessDesk; you will be asked to confirm with your MFA device."),
    (("How do I set up multi-factor authentication?", "How do I enrol my phone for MFA?",
      "What is the process to register an MFA device?"),
     "Install the Authenticator app and register it in AccessDesk under Security Info within your first day."),
    (("How do I request admin rights on my laptop?", "Can I get local administrator access?",
      "What is the process for temporary admin rights?"),
     "Request temporary admin rights in AccessDesk; they are granted for 8 hours after IT security approval."),
    (("How do I install new software?", "Can I install software on my work laptop?",
      "What is the process to get an application installed?"),
     "Install approved software from the Company Portal; anything else needs a software request in AccessDesk."),
    (("My laptop is broken, what do I do?", "How do I get a replacement laptop?",
      "What is the process for a faulty laptop?"),
     "Raise a hardware ticket in AccessDesk; a replacement laptop is shipped within 2 business days."),
    (("How do I join an email distribution list?", "How can I be added to a mailing list?",
      "Who adds me to a distribution list?"),
     "Ask the list owner to add you, or request it in AccessDesk under Distribution Lists."),
    (("How do I connect to the office Wi-Fi?", "What is the Wi-Fi network for employees?",
      "Which wireless network should I use in the office?"),
     "Connect to the Contoso-Corp network with your company credentials; guests use Contoso-Guest."),
    (("How do I get a new monitor?", "Can I request extra monitors?", "How do I order a second screen?"),
     "Order monitors from the hardware catalogue in AccessDesk; each employee can have up to two."),
    (("What should I do if my account is locked?", "My account got locked out, how do I unlock it?",
      "How do I unlock my user account?"),
     "Accounts unlock automatically after 15 minutes; for an immediate unlock call the IT service desk."),
    (("How do I report an IT incident?", "Where do I raise an IT issue?", "How do I open an IT support ticket?"),
     "Open a ticket in AccessDesk; urgent outages can also be reported in the #it-help chat channel."),
]

# --- onboarding --------------------------------------------------------------------------------
ONBOARDING = [
    (("What happens on my first day?", "What should I expect on day one?", "What is the first day schedule for new hires?"),
     "On your first day you collect your badge and laptop at reception at 9 AM, then join the welcome session at 10 AM."),
    (("Where do I collect my badge?", "How do I get my employee badge?", "Who gives new starters their access badge?"),
     "Badges are collected from building reception with photo ID on your first day."),
    (("What mandatory training do new hires complete?", "Which trainings are compulsory for new employees?",
      "What courses must I finish after joining?"),
     "New hires complete the code of conduct, security awareness and data privacy courses within 30 days."),
    (("How long is the probation period?", "Is there a probationary period for new employees?",
      "When does my probation end?"),
     "The probation period is 90 days, with a review meeting with your manager at the end."),
    (("What is the buddy program?", "Will I get an onboarding buddy?", "How does the new joiner buddy scheme work?"),
     "Every new hire is paired with a buddy from another team for the first 3 months."),
    (("When will I get my laptop?", "How is equipment delivered to new starters?", "When does my work laptop arrive?"),
     "Laptops are shipped to arrive 2 business days before your start date, or handed out at reception on day one."),
    (("How do I set up payroll?", "How do I enter my bank details for salary?", "Where do I add my bank account for payroll?"),
     "Enter your bank details in PeopleHub under Pay within your first week so that you are paid on time."),
    (("When do I need to submit my right to work documents?", "What is the deadline for identity documents?",
      "When must I provide proof of right to work?"),
     "Right to work documents must be verified by HR within 3 business days of your start date."),
    (("When is payday?", "On which day are salaries paid?", "What day of the month do we get paid?"),
     "Salaries are paid on the 25th of each month, or the previous business day if the 25th is a weekend or holiday."),
    (("How do I enrol in benefits?", "When can I sign up for health insurance?", "What is the benefits enrolment window for new hires?"),
     "Enrol in benefits in PeopleHub within 30 days of your start date; after that you wait for open enrolment in November."),
    (("When is the new hire orientation?", "How often is the onboarding orientation held?", "When does the welcome session happen?"),
     "New hire orientation runs every Monday at 10 AM."),
    (("Who do I contact with onboarding questions?", "Who helps new starters with onboarding?",
      "Where do I go with questions in my first weeks?"),
     "Your onboarding coordinator in HR is your first contact; your buddy helps with team questions."),
]

# --- security ----------------------------------------------------------------------------------
SECURITY = [
    (("How do I report a phishing email?", "What should I do with a suspicious email?",
      "I received a phishing email, how do I report it?", "Where do I send suspected phishing?"),
     "Use the Report Phishing button in Outlook; do not click links or forward the email."),
    (("What are the data classification levels?", "How is company data classified?",
      "What classification labels do we use for documents?"),
     "Data is classified as Public, Internal, Confidential or Restricted."),
    (("Can I use a USB stick?", "Are USB storage devices allowed?", "Is it OK to copy files to a USB drive?"),
     "No. USB storage devices are blocked on company laptops; use OneDrive to share files."),
    (("How long should my password be?", "What is the minimum password length?", "What are the password rules?"),
     "Passwords must be at least 14 characters long and are not reused for the last 12 changes."),
    (("When does my screen lock automatically?", "What is the screen lock timeout?", "How long before my computer locks itself?"),
     "Screens lock automatically after 5 minutes of inactivity; lock your screen manually when you step away."),
    (("How quickly must I report a security incident?", "What is the deadline to report a data breach?",
      "When should a lost laptop be reported?"),
     "Report security incidents, including lost devices, to the Security Operations Centre within 1 hour."),
    (("What is the clean desk policy?", "Do I have to clear my desk at the end of the day?", "What does the clean desk rule require?"),
     "Confidential papers must be locked away and desks cleared at the end of each day."),
    (("Can I send Confidential data to my personal email?", "Is it allowed to forward work files to my private email?",
      "May I email Restricted documents outside the company?"),
     "No. Confidential and Restricted data must never be sent to personal email accounts."),
    (("Can I use public Wi-Fi for work?", "Is it safe to work from a cafe network?", "What are the rules for public Wi-Fi?"),
     "Public Wi-Fi may be used only with the company VPN connected."),
    (("How often is security awareness training?", "How frequently do I need to redo security training?",
      "When is the security training refresher due?"),
     "Security awareness training is repeated every 12 months."),
    (("Can visitors walk around the office alone?", "What is the visitor policy?", "Do guests need an escort?"),
     "Visitors sign in at reception, wear a visitor badge and are escorted at all times."),
    (("Can I use ChatGPT with company data?", "Are public AI tools allowed for work documents?",
      "May I paste Confidential data into a public chatbot?"),
     "Only the approved Contoso Copilot may be used with Internal or Confidential data; public AI tools may be used with Public data only."),
    (("How should Restricted data be stored?", "Where can Restricted documents be saved?", "What storage is approved for Restricted data?"),
     "Restricted data is stored only in encrypted, access-controlled SharePoint sites approved by the data owner."),
    (("Can I share my password with a colleague?", "Is it OK to give my login to my manager?", "May I share credentials with my team?"),
     "No. Passwords and MFA codes must never be shared, not even with IT or your manager."),
    (("How long are access logs kept?", "What is the retention period for security logs?", "How long do we retain audit logs?"),
     "Security and access logs are retained for 1 year."),
    (("When are access rights reviewed?", "How often does the access review happen?", "Who reviews user permissions and when?"),
     "Managers review their team's access rights every quarter in AccessDesk."),
]

# --- application workflows ------------------------------------------------------------------------
WORKFLOWS = [
    (("How do I submit a purchase request?", "What is the process for buying something for my team?",
      "How do I raise a purchase requisition?"),
     "Create a purchase requisition in ProcureNow; your cost centre owner approves it before a purchase order is issued."),
    (("When does a purchase need director approval?", "What purchase amount requires a director?",
      "Above what amount must a director approve a purchase?"),
     "Purchases above $5,000 need director approval in ProcureNow."),
    (("How many quotes do I need for a purchase?", "When are three supplier quotes required?",
      "Do I need competitive quotes for a large purchase?"),
     "Three supplier quotes are required for purchases above $25,000."),
    (("When are timesheets due?", "What is the deadline for submitting my timesheet?", "By when must I fill in TimeTrack?"),
     "Timesheets are submitted in TimeTrack by Friday at 5 PM each week."),
    (("How do I correct a submitted timesheet?", "I made a mistake on my timesheet, how do I fix it?",
      "Can I edit a timesheet after submitting it?"),
     "Ask your manager to return the timesheet in TimeTrack, correct it and submit it again within 5 business days."),
    (("When is the performance review cycle?", "How often are performance reviews held?", "When do annual reviews happen?"),
     "Performance reviews run twice a year, in June and December, in PeopleHub."),
    (("How do I apply for an internal transfer?", "Can I move to another team?", "What are the rules for internal mobility?"),
     "You can apply for internal roles in PeopleHub after 12 months in your current role, after telling your manager."),
    (("How do I request a promotion?", "What is the promotion process?", "Who nominates employees for promotion?"),
     "Your manager nominates you for promotion during the review cycle, and a calibration panel decides."),
    (("When does the change advisory board meet?", "When is CAB?", "How often does the change board review changes?"),
     "The change advisory board meets every Tuesday at 2 PM to review normal changes."),
    (("How do I book a meeting room?", "Where can I reserve a conference room?", "What is the process to book a room?"),
     "Book meeting rooms in Outlook by adding the room as a resource; bookings over 4 hours need facilities approval."),
    (("How do I update my home address?", "Where do I change my personal details?", "How can I change my address in HR records?"),
     "Update your address and personal details in PeopleHub under My Profile."),
    (("How do I request a reference letter?", "Can HR provide an employment verification letter?",
      "How do I get proof of employment?"),
     "Request an employment verification letter in PeopleHub; HR issues it within 3 business days."),
    (("How do I request remote work?", "What is the process to work from home permanently?", "How do I apply for a remote working arrangement?"),
     "Submit a flexible work request in PeopleHub; your manager replies within 14 days."),
    (("How many days a week must I be in the office?", "What is the hybrid work policy?", "How many office days are required?"),
     "Hybrid employees work from the office at least 2 days a week."),
    (("How do I raise a grievance?", "Where do I report a workplace concern?", "What is the grievance procedure?"),
     "Raise a grievance in writing with your HR business partner, or anonymously through the EthicsLine."),
]

# --- offices, applications and contacts -------------------------------------------------------
OFFICES = {
    "Seattle": ("7 AM to 7 PM Monday to Friday", "on the 3rd floor"),
    "London": ("8 AM to 8 PM Monday to Friday", "on the 5th floor"),
    "Dublin": ("8 AM to 6 PM Monday to Friday", "on the ground floor"),
    "Berlin": ("7 AM to 7 PM Monday to Friday", "on the 2nd floor"),
    "Bangalore": ("8 AM to 10 PM Monday to Saturday", "on the 4th floor"),
    "Singapore": ("8 AM to 7 PM Monday to Friday", "on the 12th floor"),
    "Tokyo": ("8 AM to 8 PM Monday to Friday", "on the 9th floor"),
    "Toronto": ("7 AM to 7 PM Monday to Friday", "on the 6th floor"),
    "Sydney": ("7 AM to 6 PM Monday to Friday", "on the 2nd floor"),
    "Sao Paulo": ("8 AM to 7 PM Monday to Friday", "on the 1st floor"),
}
OFFICE_HOURS_QUESTIONS = (
    "What are the opening hours of the {city} office?",
    "When is the {city} office open?",
    "Until what time can I work in the {city} office?",
    "What time does the {city} office open and close?",
)
OFFICE_HELPDESK_QUESTIONS = (
    "Where is the IT help desk in the {city} office?",
    "Which floor is IT support on in {city}?",
    "Where can I find walk-in IT support in the {city} office?",
    "I'm in the {city} office, where do I take my laptop for repair?",
)
APPLICATIONS = {
    "PeopleHub": "the HR system for leave requests, personal details, payroll details, benefits and performance reviews",
    "ExpenseFlow": "the expense system for expense claims, receipts and corporate card statements",
    "AccessDesk": "the IT service portal for access requests, hardware, software and IT support tickets",
    "ProcureNow": "the procurement system for purchase requisitions, supplier quotes and purchase orders",
    "TimeTrack": "the time recording system for weekly timesheets and project hours",
    "Company Portal": "the self-service app catalogue for installing approved software",
    "EthicsLine": "the confidential, optionally anonymous line for reporting ethics and compliance concerns",
    "Learning Hub": "the training platform for mandatory courses, learning budgets and certifications",
    "TravelDesk": "the booking tool for business flights, hotels and rail travel",
    "Contoso Copilot": "the approved AI assistant for working with Internal and Confidential data",
}
APPLICATION_QUESTIONS = (
    "What is {app} used for?",
    "What can I do in {app}?",
    "What is {app}?",
    "Which tasks are handled in {app}?",
    "Someone told me to use {app}. What is that system?",
)
CONTACTS = {
    "payroll questions": "the payroll team through a Payroll case in PeopleHub",
    "benefits questions": "the benefits team through a Benefits case in PeopleHub",
    "a broken badge": "building reception, which replaces badges the same day",
    "travel bookings": "TravelDesk, or the travel team for trips with more than 3 travellers",
    "a data privacy request": "the Data Protection Office through the privacy form on the intranet",
    "legal contract reviews": "the legal team through a contract review request in ProcureNow",
    "facilities issues": "the facilities team through a facilities ticket in AccessDesk",
    "a workplace injury": "your manager and the health and safety team within 24 hours",
    "harassment concerns": "your HR business partner or the anonymous EthicsLine",
    "learning budget questions": "the learning team through Learning Hub",
}
CONTACT_QUESTIONS = (
    "Who do I contact about {topic}?",
    "Where should I go for {topic}?",
    "Who handles {topic}?",
    "Which team can help me with {topic}?",
)

# --- technical documentation -------------------------------------------------------------------
TECH_DOCS = [
    (("How many approvals does a pull request need?", "What is the code review rule?", "Who must approve my pull request?"),
     "Pull requests need two approvals, one of them from a code owner, before merging."),
    (("What are the incident severity levels?", "How are incidents classified?", "What do SEV1 to SEV4 mean?"),
     "Incidents are SEV1 (full outage) to SEV4 (minor issue); SEV1 needs a response within 15 minutes."),
    (("What is the response time for a SEV2 incident?", "How fast must on-call respond to SEV2?", "What is the SEV2 response target?"),
     "SEV2 incidents need a response within 30 minutes."),
    (("How long is an on-call rotation?", "How does the on-call schedule work?", "How often am I on call?"),
     "On-call rotations last one week, from Monday 10 AM to the next Monday 10 AM."),
    (("How long are application logs retained?", "What is the log retention period?", "How long do we keep service logs?"),
     "Application logs are retained for 90 days in the central logging platform."),
    (("What is the API rate limit?", "How many requests per minute does the public API allow?", "What throttling applies to the API?"),
     "The public API allows 1,000 requests per minute per client."),
    (("When is the staging environment refreshed?", "How often is staging data reset?", "When does staging get new data?"),
     "The staging environment is refreshed from anonymised production data every night at 2 AM UTC."),
    (("How long are database backups kept?", "What is the backup retention period?", "How long do we retain backups?"),
     "Database backups are retained for 35 days."),
    (("What is the recovery time objective?", "What is our RTO?", "How quickly must critical systems be restored?"),
     "The recovery time objective for critical systems is 4 hours."),
    (("What is the branch naming convention?", "How should I name my git branches?", "What format do branch names follow?"),
     "Branches are named type/TICKET-123-short-description, for example feature/PAY-42-add-export."),
    (("When is the deployment freeze?", "Are there periods when we cannot deploy?", "When are production releases frozen?"),
     "Production deployments are frozen from December 20 to January 3."),
    (("How do I deploy to production?", "What is the release process?", "How do changes reach production?"),
     "Merge to main, let the pipeline deploy to staging, then promote the release in the deployment portal after the smoke tests pass."),
    (("What is the uptime target for customer APIs?", "What SLA do our APIs have?", "What availability do we promise customers?"),
     "Customer-facing APIs have a 99.9% monthly uptime target."),
    (("How long do post-incident reviews take to publish?", "When is the postmortem due?", "When must the incident review be written?"),
     "A post-incident review is published within 5 business days of a SEV1 or SEV2 incident."),
    (("Which languages are approved for new services?", "What programming languages can I use for a new service?",
      "What is the approved tech stack for services?"),
     "New services are written in Python, Go or TypeScript unless the architecture board approves another language."),
    (("How are secrets stored?", "Where should API keys be kept?", "Can I put credentials in the repository?"),
     "Secrets are stored in Azure Key Vault and never committed to a repository."),
    (("What test coverage is required?", "What is the minimum code coverage?", "Is there a coverage threshold for merges?"),
     "New code needs at least 80% line coverage before merging."),
    (("How do I request a new DNS record?", "Who creates DNS entries?", "How do I get a new internal hostname?"),
     "Request DNS records through a network change in AccessDesk; the network team applies them within 1 business day."),
]


def _job_code_records():
    for code, (title, benefits) in JOB_CODES.items():
        answer = f"{code} job code indicates {title}."
        for question in JOB_CODE_QUESTIONS:
            yield "job_codes", question.format(code=code), answer
        benefit_answer = f"Workers with the {code} job code ({title}) are {benefits}."
        for question in JOB_CODE_BENEFIT_QUESTIONS:
            yield "job_codes", question.format(code=code), benefit_answer
    for a, b in JOB_CODE_PAIRS:
        answer = (f"{a} job code indicates {JOB_CODES[a][0]}, while {b} job code indicates "
                  f"{JOB_CODES[b][0]}.")
        for question in JOB_CODE_PAIR_QUESTIONS:
            yield "job_codes", question.format(a=a, b=b), answer


def _leave_records():
    for leave, (entitlement, request) in LEAVE.items():
        for question in LEAVE_ENTITLEMENT_QUESTIONS:
            yield "leave", question.format(leave=leave), f"Employees receive {entitlement}."
        for question in LEAVE_REQUEST_QUESTIONS:
            yield "leave", question.format(leave=leave), f"Request {leave} {request}."


def _expense_records():
    for item, answer in EXPENSE_LIMITS.items():
        for question in EXPENSE_LIMIT_QUESTIONS:
            yield "expenses", question.format(item=item), answer + "."


def _it_records():
    for system, (approver, days) in IT_SYSTEMS.items():
        unit = "business day" if days == 1 else "business days"
        answer = (f"Request {system} access in AccessDesk; it is approved by {approver} and "
                  f"granted within {days} {unit}.")
        for question in IT_ACCESS_QUESTIONS:
            yield "it_access", question.format(system=system), answer


def _office_records():
    for city, (hours, floor) in OFFICES.items():
        for question in OFFICE_HOURS_QUESTIONS:
            yield "offices", question.format(city=city), f"The {city} office is open {hours}."
        for question in OFFICE_HELPDESK_QUESTIONS:
            yield "offices", question.format(city=city), f"The {city} IT help desk is {floor}."


def _application_records():
    for app, purpose in APPLICATIONS.items():
        for question in APPLICATION_QUESTIONS:
            yield "workflows", question.format(app=app), f"{app} is {purpose}."
    for topic, contact in CONTACTS.items():
        for question in CONTACT_QUESTIONS:
            yield "contacts", question.format(topic=topic), f"For {topic}, contact {contact}."


# Framings that people put around a question; each listed fact is also asked with two of them.
FRAMINGS = ("According to company policy, {q}", "I'm new here. {Q}", "Quick question: {q}",
            "Hi, {q} Thanks!")


def _listed(category, facts):
    for index, (questions, answer) in enumerate(facts):
        for question in questions:
            yield category, question, answer
        for offset, question in enumerate(questions[:2]):
            framing = FRAMINGS[(index + offset) % len(FRAMINGS)]
            lowered = question[0].lower() + question[1:]
            yield category, framing.format(q=lowered, Q=question), answer


def generate_records(seed: int = 20241201) -> list[dict]:
    """Every record of the embedded dataset, in a deterministic shuffled order."""
    rows = [
        *_job_code_records(), *_leave_records(), *_expense_records(), *_it_records(),
        *_listed("onboarding", ONBOARDING), *_listed("security", SECURITY),
        *_listed("workflows", WORKFLOWS), *_listed("tech_docs", TECH_DOCS),
        *_listed("expenses", EXPENSE_RULES), *_listed("it_access", IT_HOWTO),
        *_office_records(), *_application_records(),
    ]
    rng = random.Random(seed)
    records = []
    for category, instruction, output in rows:
        # Most records carry the main system prompt, as a real assistant's data would.
        system = SYSTEM_PROMPTS[0] if rng.random() < 0.8 else rng.choice(SYSTEM_PROMPTS[1:])
        records.append({"system": system, "instruction": instruction, "output": output,
                        "category": category})
    rng.shuffle(records)
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/raw/corporate_qa.jsonl")
    parser.add_argument("--check", action="store_true",
                        help="verify that --out matches the generator instead of writing it")
    args = parser.parse_args(argv)
    text = render(generate_records())
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} differs from the generator output; run python -m stages.make_dataset",
                  file=sys.stderr)
            return 1
        print(f"{out} matches the generator ({text.count(chr(10))} records)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} records to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
